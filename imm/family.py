"""The IMM family's adapter to the core (`neon.family.Family`).

θ is the `ema` network (an `IMMPrecond` over a DiT) of an IMM checkpoint. Checkpoints read: the
official `imagenet256_ts_a2.pkl` (HF lumaai/imm) and the authors' `Neon_imm_imagenet256.pkl`
(NVlabs persistence pickles, like EDM's, whose modules also name timm and torch layer classes: read
as data by the restricted unpickler of `neon.io.unpickle` with the allowlist declared here, never
running the source they embed), our `.pt`/`.pth` files (`{'ema': state_dict, 'arch': kwargs,
'raw_mean', 'raw_std', 'vae_config'}`: fine-tune snapshots, merges) and plain `.safetensors` (the
arch then comes from `--model.arch im256`). `arch` holds the class name and the constructor kwargs
(a pickle's `_init_kwargs`); the network is always built in float32 whatever `mixed_precision` the
file records: sampling is Neon's float32 evaluation path, and fine-tuning takes its precision from
`finetune.precision` (the core's autocast).

The latent space is Stability's SD-VAE ft-EMA, a diffusers `AutoencoderKL` kept apart as the codec
(`--model.codec`: its diffusers folder, default `checkpoints/sd-vae-ft-ema`, or a weights file of
it), with IMM's per-channel normalisation of the raw latents (EDM2-style: `raw_mean`/`raw_std` of
upstream's configs/im256*.yaml, final std 0.5), carried in `extras`.

Sampling is Neon's `calculate_fid.py` path: σ_d·N(0, I) latents drawn per sample from a CPU
generator seeded with its seed (so they do not depend on the batch or the device), the uniform
pushforward sampler with T steps and classifier-free guidance in float32, VAE decode, uint8 by
truncation. The loss is the authors' IMMLoss on latents encoded on the fly (a posterior sample per
image), every draw from the core's generator; the label dropout stays on the student branch only,
as the authors have it.
"""

import dataclasses
import math
import os

import torch

from edm.family import NVLABS_PICKLE_GLOBALS, from_network_pickle
from imm.loss import IMMLoss
from imm.networks import IMMPrecond
from imm.sampler import generators, initial_latents, pushforward_generator_fn
from imm.vae import (
    IM256_RAW_MEAN,
    IM256_RAW_STD,
    SD_VAE_CONFIG,
    StabilityVAEEncoder,
    build_autoencoder,
    load_autoencoder,
)
from neon.errors import NeonError
from neon.family import Model, arch_kwargs, check_finite, load_built, preset_of, read_checkpoint
from neon.io import checkpoint, unpickle

DEFAULT_CODEC = os.path.join("checkpoints", "sd-vae-ft-ema")
FINAL_STD = 0.5  # upstream's encoder final_std (final_mean 0): latents have σ_d = 0.5

# The network of both IMM ImageNet-256 checkpoints (upstream's im256_generate_images.yaml plus the
# interface kwargs its training loop adds): DiT-XL/2 on 32×32×4 latents, 1000 classes.
PRESETS = {
    "im256": {
        "class_name": "IMMPrecond",
        "img_resolution": 32,
        "img_channels": 4,
        "label_dim": 1000,
        "num_classes": 1000,
        "mixed_precision": None,
        "model_type": "DiT_XL_2",
        "s_embed": True,
        "noise_schedule": "fm",
        "f_type": "euler_fm",
        "temb_type": "stride",
        "time_scale": 1000,
        "sigma_data": 0.5,
        "eps": 0.0,
        "T": 0.994,
    },
}
TINY = {
    **PRESETS["im256"],
    "img_resolution": 8,
    "label_dim": 10,
    "num_classes": 10,
    "model_type": "DiT",
    "patch_size": 2,
    "hidden_size": 32,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 4.0,
}
# A two-level AutoencoderKL (one 2× down-sampling): 8×8×4 latents are 16×16 images.
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "act_fn": "silu",
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "block_out_channels": [16, 32],
    "sample_size": 16,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
}
PAPER_FILES = {"imagenet256_ts_a2.pkl": "im256", "imagenet256_ts_a1.pkl": "im256"}
LATENTS = {"raw_mean": list(IM256_RAW_MEAN), "raw_std": list(IM256_RAW_STD)}
# The authors' im256.yaml loss (IMMLoss's own defaults, spelled out).
LOSS = {
    "sigma": 1,
    "sample_t_mode": "uniform",
    "matrix_size": 4,
    "sample_repeat": 1,
    "a": 2,
    "b": 4,
    "k": 12,
    "label_dropout": 0.1,
    "min_tr_gap": 1e-4,
}


def _timm_format(value):
    """timm's `Format` enum (PatchEmbed's `output_fmt`) pickles as a call `Format('NCHW')`: keep the
    string."""
    if not isinstance(value, str):
        raise ValueError("malformed timm Format record")
    return value


# The layer classes the modules of an IMM pickle name besides the persistent ones: timm's (as of
# timm 1.0.8, which upstream pins; Attention later moved to timm.layers.attention) and torch's. Their
# objects arrive as records (class name + state), like the persistent ones.
_LAYER_CLASSES = {
    "timm.layers.patch_embed": ("PatchEmbed",),
    "timm.layers.mlp": ("Mlp",),
    "timm.models.vision_transformer": ("Attention",),
    "timm.layers.attention": ("Attention",),
    "torch.nn.modules.linear": ("Linear", "Identity"),
    "torch.nn.modules.conv": ("Conv2d",),
    "torch.nn.modules.normalization": ("LayerNorm",),
    "torch.nn.modules.activation": ("SiLU", "GELU"),
    "torch.nn.modules.dropout": ("Dropout",),
    "torch.nn.modules.sparse": ("Embedding",),
}
IMM_PICKLE_GLOBALS = {
    **NVLABS_PICKLE_GLOBALS,
    **{
        (module, name): unpickle.record_class(name)
        for module, names in _LAYER_CLASSES.items()
        for name in names
    },
    ("timm.layers.format", "Format"): _timm_format,
    # IMMPrecond keeps its autocast dtype as an attribute (torch.float32 when mixed_precision is None).
    **{("torch", name): getattr(torch, name) for name in ("float16", "bfloat16", "float32", "float64")},
}

FORMAT = checkpoint.Format(
    weight_keys=((), ("ema",)), pickle_globals=IMM_PICKLE_GLOBALS, from_pickle=from_network_pickle
)


@dataclasses.dataclass(frozen=True)
class IMMSampler:
    """`pushforward_generator_fn`'s settings: T steps on the 'uniform' (or 'edm') time grid and the
    guidance scale (None or 1: one conditional pass per step, no guidance)."""

    num_steps: int = 8
    cfg: float | None = 1.5
    discretization: str = "uniform"

    def __post_init__(self):
        if self.num_steps < 1 or self.discretization not in ("uniform", "edm"):
            raise NeonError("sampler: need num_steps >= 1 and discretization 'uniform' or 'edm'")
        if self.cfg is not None and not math.isfinite(self.cfg):
            raise NeonError(f"sampler.cfg must be a finite number or null, got {self.cfg}")


class _TargetInFloat32:
    """What IMMLoss calls as `net`: the student call goes to `net` as it is (under the fine-tune's
    autocast, as upstream's student runs under the network's own fp16 autocast); the target call
    (force_fp32=True) runs with autocast off, as upstream's does. `.module` is the IMMPrecond."""

    def __init__(self, net):
        self.net = net
        self.module = getattr(net, "module", net)

    def __call__(self, x, t, s, class_labels, force_fp32=False):
        if not force_fp32:
            return self.net(x, t, s, class_labels)
        with torch.autocast(x.device.type, enabled=False):
            return self.net(x, t, s, class_labels, force_fp32=True)


class IMMFamily:
    name = "imm"
    Sampler = IMMSampler
    format = FORMAT

    def tiny(self, seed: int) -> Model:
        """A DiT of two blocks on 8×8×4 latents and a two-level AutoencoderKL (16×16 images), about
        0.2M parameters in all. DiT's adaLN-Zero leaves its map the identity at initialisation, so
        every zero parameter is redrawn from N(0, 0.05²): labels and guidance then change samples."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = self._network(TINY, "cpu")
            with torch.no_grad():
                for p in net.parameters():
                    if not p.any():
                        p.normal_(std=0.05)
            vae = build_autoencoder(TINY_VAE, device="cpu")
        return self._model(net, vae, TINY, {**LATENTS, "vae_config": dict(TINY_VAE)})

    def load(
        self, path: str, arch: str | None = None, device: torch.device | str = "cpu", codec: str | None = None
    ) -> Model:
        container = read_checkpoint(self, path)
        kwargs = arch_kwargs(container, arch, PRESETS, "IMM")
        if kwargs is None:
            raise NeonError(f"{path} does not say its arch; pass --model.arch {'|'.join(PRESETS)}")
        extras = {key: container.data.get(key) or LATENTS[key] for key in LATENTS}
        extras["vae_config"] = container.data.get("vae_config")
        kwargs = {**kwargs, "mixed_precision": None}
        net = self._network(kwargs, "meta", path)  # no allocation nor init: every tensor comes from the file
        net = load_built(net, container.weights, path, "IMMPrecond", device)
        vae = _read_codec(codec or DEFAULT_CODEC, extras["vae_config"])
        return self._model(net, vae.to(device), kwargs, extras)

    def sample(
        self, model: Model, labels: torch.Tensor, seeds: torch.Tensor, sampler: IMMSampler
    ) -> torch.Tensor:
        net = model.net
        device = next(net.parameters()).device
        cfg = None if sampler.cfg is None or sampler.cfg == 1 else float(sampler.cfg)
        if cfg is not None and not net.label_dim:
            raise NeonError("sampler.cfg: guidance needs a class-conditional network; pass --sampler.cfg 1")
        with torch.inference_mode():
            shape = (net.img_channels, net.img_resolution, net.img_resolution)
            latents = initial_latents(generators(seeds.tolist()), shape, net.sigma_data, device=device)
            class_labels = self._one_hot(labels, net.label_dim, device) if net.label_dim else None
            x = pushforward_generator_fn(
                net,
                latents,
                class_labels,
                discretization=sampler.discretization,
                num_steps=sampler.num_steps,
                cfg_scale=cfg,
            )
            return self._encoder(model).decode(check_finite(x, "IMM sampler"))

    def loss(
        self, model: Model, samples: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """IMMLoss (the authors' im256 settings) averaged over the groups of M = 4 images. Each uint8
        image is encoded to a posterior sample of its latent (VAE in float32, autocast off; the
        noise from `generator`); then t, s, the label drop and the noise are drawn from `generator`.
        The per-process batch must be a multiple of 4."""
        group = LOSS["matrix_size"]
        if samples.shape[0] % group:
            raise NeonError(
                f"IMM's loss takes groups of {group} images: the per-process batch must be a "
                f"multiple of {group}, got {samples.shape[0]}"
            )
        precond = getattr(model.net, "module", model.net)
        with torch.autocast(samples.device.type, enabled=False):
            encoder = self._encoder(model)
            latents = encoder.encode_latents(encoder.encode_pixels(samples), generator=generator)
        class_labels = self._one_hot(labels, precond.label_dim, samples.device) if precond.label_dim else None
        per_group = IMMLoss(**LOSS)(_TargetInFloat32(model.net), latents, class_labels, generator=generator)
        return per_group.mean()

    def container(self, model: Model, state_dict: dict[str, torch.Tensor]) -> dict:
        """`{'ema', 'arch', 'raw_mean', 'raw_std', 'vae_config'}`: the latent normalisation and the
        codec's config (None: the SD-VAE's) travel with θ."""
        return {"ema": state_dict, "arch": model.arch, **model.extras}

    @staticmethod
    def _one_hot(labels: torch.Tensor, label_dim: int, device) -> torch.Tensor:
        """float32 one-hot rows [B, label_dim]; label −1 is an all-zero row (unconditional)."""
        if (labels < -1).any() or (labels >= label_dim).any():
            raise NeonError(
                f"class labels must be in [0, {label_dim}) for this conditional model, "
                f"or -1 for unconditional"
            )
        # Shift by one so that −1 lands in a column that is then dropped.
        rows = torch.nn.functional.one_hot(labels.to(device) + 1, label_dim + 1)[:, 1:]
        return rows.to(torch.float32)

    @staticmethod
    def _encoder(model: Model) -> StabilityVAEEncoder:
        return StabilityVAEEncoder(
            model.codec,
            raw_mean=model.extras["raw_mean"],
            raw_std=model.extras["raw_std"],
            final_std=FINAL_STD,
        )

    def full_size(self, ckpt: str | None, arch: str | None) -> Model:
        kwargs = preset_of(ckpt, arch, PRESETS, PAPER_FILES, "IMM")
        return self._model(
            self._network(kwargs, "meta"),
            build_autoencoder(None, "meta"),
            kwargs,
            {**LATENTS, "vae_config": None},
        )

    def evaluations(self, sampler: IMMSampler) -> float:
        """One network call per step, at the doubled batch of guidance."""
        return sampler.num_steps * (1.0 if sampler.cfg is None or sampler.cfg == 1 else 2.0)

    @staticmethod
    def _network(arch: dict, device, path: str = "the arch") -> IMMPrecond:
        kwargs = dict(arch)
        if kwargs.pop("class_name", "IMMPrecond") != "IMMPrecond":
            raise NeonError(f"{path}: the network is a {arch['class_name']}, not an IMMPrecond")
        try:
            with torch.device(device):
                return IMMPrecond(**kwargs)
        except (TypeError, KeyError, ValueError, AssertionError) as e:
            raise NeonError(
                f"{path}: cannot build IMMPrecond from its arch ({e}); pass --model.arch {'|'.join(PRESETS)}"
            ) from None

    @staticmethod
    def _model(net: IMMPrecond, vae, arch: dict, extras: dict) -> Model:
        net.eval().requires_grad_(False)
        vae.eval().requires_grad_(False)
        scale = 2 ** (len(vae.config.block_out_channels) - 1)  # the VAE's down-sampling factor
        return Model(
            net=net,
            codec=vae,
            image_size=net.img_resolution * scale,
            num_classes=net.label_dim,
            arch=dict(arch),
            extras=dict(extras),
        )


def _read_codec(path: str, vae_config: dict | None):
    """The AutoencoderKL at `path`: a diffusers folder (config.json + weights), or a weights file
    (.safetensors/.pt) of an AutoencoderKL with `vae_config` (None: the SD-VAE's)."""
    if os.path.isdir(path):
        try:
            return load_autoencoder(path)
        except (OSError, ValueError) as e:
            raise NeonError(f"cannot read the VAE folder {path}: {str(e).splitlines()[0]}") from None
    if os.path.isfile(path):
        vae = build_autoencoder(vae_config or SD_VAE_CONFIG, device="cpu")
        return load_built(vae, checkpoint.read(path).weights, path, "the AutoencoderKL")
    raise NeonError(
        f"no VAE at {path}; pass --model.codec DIR (the diffusers folder of stabilityai/sd-vae-ft-ema, "
        f"download_models.sh)"
    )


family = IMMFamily()
