"""The latent space of IMM ImageNet-256: Stability's SD-VAE (`stabilityai/sd-vae-ft-ema`, a diffusers
`AutoencoderKL`) with IMM's per-channel normalisation of the raw latents.

Compatible with `StabilityVAEEncoder` of `lumalabs/imm:training/encoders.py` @ c9473e9 (the same
file in `SinaAlemohammad/Neon:imm/training/encoders.py` @ 76496c3; code licensed CC BY-NC-SA 4.0 by
NVIDIA); written anew. Differences: the AutoencoderKL is passed in (or loaded from a local folder)
rather than fetched from the Hugging Face hub, it is not torch.compile'd, and `encode_latents`
accepts the noise (or a generator) instead of always drawing from the global generator.

Final latents x = raw·scale + bias per channel, scale = final_std/raw_std and
bias = final_mean - raw_mean·scale (float32), with no 0.18215 factor.
"""

import torch

# The normalisation constants of configs/im256*.yaml (raw SD-VAE latents of ImageNet-256).
IM256_RAW_MEAN = (0.86488, -0.27787343, 0.21616915, 0.3738409)
IM256_RAW_STD = (4.85503674, 5.31922414, 3.93725398, 3.9870003)

# diffusers' AutoencoderKL config of stabilityai/sd-vae-ft-ema (and -ft-mse).
SD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    act_fn="silu",
    layers_per_block=2,
    norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512),
    sample_size=256,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)


def build_autoencoder(config=None, device="meta"):
    """An AutoencoderKL from `config` (default: the SD-VAE's), built on `device` ('meta' allocates
    nothing: use it to check key layouts; load real weights with `load_autoencoder`)."""
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**dict(SD_VAE_CONFIG if config is None else config))


def load_autoencoder(folder, dtype=torch.float32, device="cpu"):
    """The AutoencoderKL saved in the local folder `folder` (config.json + weights; never the hub),
    in eval mode without gradients."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    return vae.eval().requires_grad_(False).to(device)


class StabilityVAEEncoder:
    """Pixels <-> IMM latents through an AutoencoderKL `vae` (its device and dtype are used for the
    VAE calls; results come back on the input's device). The VAE runs in chunks of `batch_size`."""

    def __init__(
        self, vae, raw_mean=IM256_RAW_MEAN, raw_std=IM256_RAW_STD, final_mean=0.0, final_std=0.5, batch_size=8
    ):
        self.vae = vae
        f32 = dict(dtype=torch.float32)
        self.scale = torch.tensor(final_std, **f32) / torch.tensor(raw_std, **f32)
        self.bias = torch.tensor(final_mean, **f32) - torch.tensor(raw_mean, **f32) * self.scale
        self.batch_size = int(batch_size)

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32, device="cpu", **kwargs):
        """The encoder around `load_autoencoder(folder, dtype, device)`."""
        return cls(load_autoencoder(folder, dtype, device), **kwargs)

    def _chunks(self, x, fn):
        """fn over batch_size chunks of x, run in the VAE's device and dtype; float32 on x's device."""
        p = next(self.vae.parameters())
        out = [
            fn(chunk.to(device=p.device, dtype=p.dtype)).to(device=x.device, dtype=torch.float32)
            for chunk in x.split(self.batch_size)
        ]
        return torch.cat(out)

    def _channel(self, v, like):
        return v.to(like.device).reshape(1, -1, 1, 1)

    @torch.no_grad()
    def encode_pixels(self, x):
        """uint8 [N, 3, H, W] -> raw posterior mean ‖ std, float32 [N, 8, H/8, W/8]."""

        def posterior(chunk):
            dist = self.vae.encode(chunk).latent_dist
            return torch.cat([dist.mean, dist.std], dim=1)

        return self._chunks(x.to(torch.float32) / 127.5 - 1, posterior)

    def encode_latents(self, mean_std, noise=None, generator=None):
        """Raw mean ‖ std [N, 8, h, w] -> final latents float32 [N, 4, h, w]: a posterior sample
        mean + noise·std, normalised. `noise` [N, 4, h, w] ~ N(0, I) is drawn when not given (from
        `generator`, else torch's default generator of the input's device, like randn_like)."""
        mean, std = mean_std.to(torch.float32).chunk(2, dim=1)
        if noise is None:
            device = mean.device if generator is None else generator.device
            noise = torch.randn(mean.shape, device=device, generator=generator).to(mean.device)
        x = mean + noise.to(mean) * std
        return x * self._channel(self.scale, x) + self._channel(self.bias, x)

    def encode(self, x, noise=None, generator=None):
        """uint8 pixels [N, 3, H, W] or raw mean ‖ std [N, 8, h, w] -> final latents [N, 4, h, w]."""
        if x.shape[1] == 3:
            x = self.encode_pixels(x)
        elif x.shape[1] != 8:
            raise ValueError(f"expected 3 (pixels) or 8 (mean and std) channels, got {x.shape[1]}")
        return self.encode_latents(x, noise=noise, generator=generator)

    def raw_latents(self, latents):
        """Final latents [N, 4, h, w] -> raw VAE latents, float32 (the inverse normalisation)."""
        x = latents.to(torch.float32)
        return (x - self._channel(self.bias, x)) / self._channel(self.scale, x)

    @torch.no_grad()
    def decode(self, latents):
        """Final latents [N, 4, h, w] -> uint8 pixels [N, 3, 8h, 8w]: VAE decode of the raw latents,
        then ((y + 1)/2 clamped to [0, 1])·255 truncated to uint8."""
        if latents.shape[1] != 4:
            raise ValueError(f"expected 4 latent channels, got {latents.shape[1]}")
        y = self._chunks(self.raw_latents(latents), lambda chunk: self.vae.decode(chunk).sample)
        return ((y * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
