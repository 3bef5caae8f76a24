"""The KL-regularised VAE of MAR and xAR (LDM's KL autoencoder; "KL-16" = 16 channels at stride 16).

State-dict compatible with `LTH14/mar:models/vae.py` @ fe470ac (MIT License, Copyright (c) 2024 Tianhong Li),
which `OliverRensu/xAR` and SinaAlemohammad/Neon copy. Written anew; module and parameter names (hence
state-dict keys and their order) and the numerics follow upstream. The official weights are `kl16.ckpt`,
whose `'model'` entry is this state dict (`vae_state_dict`).

Shapes: images float32 [B, 3, H, W] in [-1, 1]; latents [B, embed_dim, H/2^(L-1), W/2^(L-1)] for
L = len(ch_mult). xAR trains on `posterior.sample() · LATENT_SCALE` and decodes
`decode(tokens / LATENT_SCALE)`.
"""

import torch
import torch.nn.functional as F
from torch import nn

LATENT_SCALE = 0.2325


def _swish(x):
    return x * torch.sigmoid(x)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """x + conv2(swish(norm2(conv1(swish(norm1 x))))), the skip a 1×1 conv when the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (1×1 conv projections), residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C)
        return x + self.proj_out(out.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list, attn: list, downsample=None, upsample=None) -> nn.Module:
    """One resolution level: `block`, `attn` and, between levels, `downsample` or `upsample` (else None)."""
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    level.downsample, level.upsample = downsample, upsample
    return level


def _middle(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = (
        ResnetBlock(channels, channels),
        AttnBlock(channels),
        ResnetBlock(channels, channels),
    )
    return mid


def _run_middle(mid, h):
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """conv_in; per level num_res_blocks ResnetBlocks (each followed by attention at the levels whose
    nominal resolution, counted from `resolution`, is in attn_resolutions), downsampling between levels;
    middle (res, attn, res); norm, swish, conv_out to 2·z_channels (mean and log-variance)."""

    def __init__(
        self,
        ch=128,
        ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2,
        attn_resolutions=(16,),
        in_channels=3,
        resolution=256,
        z_channels=16,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        width, res = ch, resolution
        for i, mult in enumerate(ch_mult):
            blocks, attn = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(width, ch * mult))
                width = ch * mult
                if res in attn_resolutions:
                    attn.append(AttnBlock(width))
            last = i == len(ch_mult) - 1
            self.down.append(_level(blocks, attn, downsample=None if last else Downsample(width)))
            res = res if last else res // 2
        self.mid = _middle(width)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if level.downsample is not None:
                h = level.downsample(h)
        h = _run_middle(self.mid, h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_in from z_channels; middle (res, attn, res); from the coarsest level up, num_res_blocks + 1
    ResnetBlocks and nearest upsampling between levels; norm, swish, conv_out to 3 channels (unclamped).
    `up[i]` is level i (finest first), as in upstream's state dict."""

    def __init__(self, ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16):
        super().__init__()
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = _middle(width)
        levels = []
        for i in reversed(range(len(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(width, ch * ch_mult[i]))
                width = ch * ch_mult[i]
            levels.insert(0, _level(blocks, [], upsample=Upsample(width) if i else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, out_ch, 3, padding=1)

    def forward(self, z):
        h = _run_middle(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior N(mean, std²), from moments [B, 2E, h, w] = [mean | logvar];
    logvar is clamped to [-30, 20]."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std·ε, ε = float32 `torch.randn(mean.shape)` from `generator` (on its device), or from
        torch's default CPU generator when None (as upstream, which draws on the CPU whatever the device)."""
        device = generator.device if generator is not None else "cpu"
        eps = torch.randn(self.mean.shape, generator=generator, device=device)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """MAR's KL autoencoder: `AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))` is KL-16.

    ch = 128 and 2 res blocks per level; encoder attention at nominal resolution 16 (resolution 256 is
    fixed, as upstream) and in the middle blocks; decoder attention only in the middle. With
    use_variational=False the posterior has log-variance 1 (upstream's convention). Weights are loaded by
    the caller (`load_state_dict(vae_state_dict(ckpt))`); upstream's `ckpt_path` is not supported.
    """

    def __init__(self, embed_dim: int, ch_mult, use_variational: bool = True):
        super().__init__()
        self.encoder = Encoder(ch_mult=tuple(ch_mult), z_channels=embed_dim)
        self.decoder = Decoder(ch_mult=tuple(ch_mult), z_channels=embed_dim)
        self.use_variational = use_variational
        self.quant_conv = nn.Conv2d(2 * embed_dim, (2 if use_variational else 1) * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x float [B, 3, H, W] in [-1, 1] -> posterior over [B, embed_dim, h, w]."""
        moments = self.quant_conv(self.encoder(x))
        if not self.use_variational:
            moments = torch.cat([moments, torch.ones_like(moments)], dim=1)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, embed_dim, h, w] (unscaled) -> images [B, 3, H, W], roughly in [-1, 1], not clamped."""
        return self.decoder(self.post_quant_conv(z))


def kl16() -> AutoencoderKL:
    """The KL-16 VAE of MAR / xAR (66.5M parameters)."""
    return AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))


def vae_state_dict(ckpt: dict) -> dict:
    """The VAE state dict inside a loaded `kl16.ckpt` ({'model': state dict}) or a flat one.
    Upstream loads it with strict=False; the official file matches every key of `kl16()`."""
    return ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt
