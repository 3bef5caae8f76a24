"""The xAR family's adapter to the core (`neon.family.Family`).

θ is the xAR transformer, read from the EMA where a file has one: `{'model_ema': …}` (Neon fine-tune
snapshots, upstream's full training checkpoints, ours), `{'state_dict': …}`, `{'model': …}` or flat
(`xAR-B.pth`, `xAR-L.pth`); an `args` entry saved as an `argparse.Namespace` is read as data. The
MAR KL-16 VAE is a frozen codec in its own file (`--model.codec`, default `checkpoints/kl16.ckpt`,
`{'model': state dict}` or flat), loaded strictly, its configuration read from its weights. The
architecture comes from `--model.arch` (xar_base, xar_large, xar_huge), the file's `arch`, or the
weights (widths, depths, head width from the RoPE table); the image size follows from the VAE's stride
(the xAR token grid is always 16×16).

Buffers: `mask` holds −inf, so the core's merge copies it from the base; the RoPE tables are finite and
would be extrapolated, which moves them by float32 rounding even though base and self-trained hold the
same tables. They are constants of the architecture, so every state-dict load into the network puts
back the values the constructor computes (after checking the loaded ones agree), and a merged model
samples with exactly the base's tables.

Sampling is upstream's `sample_tokens` with one CPU generator per sample (seeded with its seed; all draws
of sample i come from it and are moved to the model's device, so a seed draws the same noise on the CPU
and on CUDA), autocast on CUDA (fp16 as upstream, or bf16), float32 on the CPU, then the VAE
decodes and images are truncated to uint8. The loss is upstream's fine-tuning loss on the uint8 batch:
random horizontal flip, VAE posterior sample × 0.2325 (in float32, outside autocast, as upstream),
label drop 0.1 to the null class 1000, a logit-normal time per (cell, sample), v-prediction MSE; every
draw comes from the given generator, dropout from the global RNG the fine-tune reseeds per step.
"""

import dataclasses
import functools
import os
import types

import torch

from neon.errors import NeonError
from neon.family import Model, arch_kwargs, check_finite, load_built, preset_of, read_checkpoint
from neon.io import checkpoint
from xAR.loss import draw_flow_inputs, encode_images, flow_loss
from xAR.models.vae import AutoencoderKL, Decoder, Encoder
from xAR.models.xar import CHANNELS, GRID, NULL_CLASS, Rope2D, xAR
from xAR.sampler import decode, per_sample_randn, sample_tokens, to_uint8

DEFAULT_CODEC = os.path.join("checkpoints", "kl16.ckpt")

# Upstream's constructor kwargs as Neon's scripts build the models (dropout 0.1 is active while
# fine-tuning; sampling runs in eval mode).
_COMMON = {
    "img_size": 256,
    "vae_stride": 16,
    "patch_size": 1,
    "vae_embed_dim": 16,
    "class_num": 1000,
    "label_drop_prob": 0.1,
    "attn_dropout": 0.1,
    "proj_dropout": 0.1,
    "mlp_ratio": 4.0,
}


def _preset(width: int, depth: int, heads: int) -> dict:
    return {
        **_COMMON,
        "encoder_embed_dim": width,
        "encoder_depth": depth,
        "encoder_num_heads": heads,
        "decoder_embed_dim": width,
        "decoder_depth": depth,
        "decoder_num_heads": heads,
    }


PRESETS = {
    "xar_base": _preset(768, 8, 12),
    "xar_large": _preset(1024, 16, 16),
    "xar_huge": _preset(1280, 20, 16),
}

# tiny(): width 32 (2 heads of 16), 1 + 1 blocks, 10 classes; a KL VAE with 32 base channels and one
# downsampling, so 32 px images make the 16×16 latent grid.
TINY = {**_preset(32, 1, 2), "img_size": 32, "vae_stride": 2, "class_num": 10}
# The paper's tokenizer, kl16.ckpt (what `infer_vae_config` reads from it), and checkpoints.
KL16 = {"embed_dim": 16, "ch_mult": [1, 1, 2, 2, 4], "ch": 128, "num_res_blocks": 2, "use_variational": True}
PAPER_FILES = {"xAR-B.pth": "xar_base", "xAR-L.pth": "xar_large", "xAR-H.pth": "xar_huge"}
TINY_VAE = {"embed_dim": 16, "ch_mult": [1, 2], "ch": 32, "num_res_blocks": 2, "use_variational": True}

# Transformer files: the EMA first (Neon snapshots, upstream training checkpoints, ours), then the
# wrappings Neon's calculate_fid.py reads, then flat.
FORMAT = checkpoint.Format(weight_keys=(("model_ema",), ("state_dict",), ("model",), ()))
CODEC_FORMAT = checkpoint.Format(weight_keys=(("model",), ("state_dict",), ()))

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


@dataclasses.dataclass(frozen=True)
class XARSampler:
    """`sample_tokens` settings: guidance `cfg` at the last cell (ramped from 1 at the first), `num_steps`
    Euler–Maruyama steps per cell (upstream: xAR-B 2.7 / 40, xAR-L 2.3 / 50) and the autocast precision of
    the network and VAE on CUDA (fp16 as upstream, bf16, or fp32; the CPU always runs float32)."""

    cfg: float = 2.7
    num_steps: int = 40
    precision: str = "fp16"

    def __post_init__(self):
        if self.num_steps < 3:
            raise NeonError(
                f"sampler: xAR needs num_steps >= 3, got {self.num_steps} "
                f"(upstream fails at 1 and duplicates its key/value cache at 2)"
            )
        if self.precision not in PRECISIONS:
            raise NeonError(
                f"sampler.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )


class XARNet(xAR):
    """`xAR` as the family runs it: `forward` is `velocity` (so the core's DDP wrapper sees the
    training forward), and every `load_state_dict` ends by putting back the buffers the constructor
    computes (`mask`, RoPE tables), after checking the loaded ones agree with them. Same state dict."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.register_load_state_dict_post_hook(_restore_constant_buffers)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.velocity(x_t, t, labels)


class XARFamily:
    name = "xar"
    Sampler = XARSampler
    format = FORMAT

    def tiny(self, seed: int) -> Model:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = XARNet(**TINY)
            vae = build_vae(TINY_VAE)
            vae.to_empty(device="cpu")
            for module in vae.modules():  # the default init of every conv and norm
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        return _model(net, vae, TINY)

    def load(
        self, path: str, arch: str | None = None, device: torch.device | str = "cpu", codec: str | None = None
    ) -> Model:
        container = read_checkpoint(self, path)
        weights = container.weights
        vae, stride = _load_vae(codec or DEFAULT_CODEC)
        kwargs = arch_kwargs(container, arch, PRESETS, "xAR")
        if kwargs is None:  # a flat or wrapped upstream file: the weights say the rest, the VAE the geometry
            kwargs = {**infer_arch(weights, path), "img_size": GRID * stride, "vae_stride": stride}
        elif kwargs.get("img_size", 256) != GRID * stride or kwargs.get("vae_stride", 16) != stride:
            raise NeonError(
                f"{path}: its xAR arch expects {kwargs.get('img_size', 256)} px images at stride "
                f"{kwargs.get('vae_stride', 16)}, but the VAE has stride {stride} "
                f"({GRID * stride} px); pass the matching --model.codec"
            )
        try:
            with torch.device("meta"):
                net = XARNet(**kwargs)
        except (TypeError, ValueError) as e:
            raise NeonError(f"{path}: cannot build xAR with arch {kwargs}: {e}") from None
        return _model(load_built(net, weights, path, "xAR", device).float(), vae.to(device), kwargs)

    def sample(
        self, model: Model, labels: torch.Tensor, seeds: torch.Tensor, sampler: XARSampler
    ) -> torch.Tensor:
        net = model.net
        device = net.mask.device
        labels = _class_labels(labels, model.num_classes).to(device)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        dtype = PRECISIONS[sampler.precision]
        with (
            torch.inference_mode(),
            torch.autocast(
                "cuda", dtype=dtype or torch.float32, enabled=device.type == "cuda" and dtype is not None
            ),
        ):
            tokens = sample_tokens(
                net, labels, sampler.num_steps, sampler.cfg, randn=per_sample_randn(generators)
            )
            images = decode(model.codec, tokens)
        return to_uint8(check_finite(images, "xAR sampler"))

    def loss(
        self, model: Model, samples: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Flow-matching MSE of the batch: flips, then the posterior noise, then label drop, cell
        noise and times, all from `generator`; dropout draws from the global RNG."""
        net = model.net  # xAR, or the core's DDP wrapper of it
        label_drop_prob = getattr(net, "module", net).label_drop_prob
        device = samples.device
        with torch.autocast(device.type, enabled=False):  # upstream encodes in float32, outside autocast
            x0 = encode_images(model.codec, samples, generator)
        drop, t, noise = draw_flow_inputs(len(x0), label_drop_prob, generator, device)
        # flow_loss calls `.velocity`; route it through net(...) so a DDP wrapper runs its forward.
        return flow_loss(
            types.SimpleNamespace(velocity=net),
            x0,
            _class_labels(labels, model.num_classes).to(device),
            drop,
            t,
            noise,
        )

    def full_size(self, ckpt: str | None, arch: str | None) -> Model:
        kwargs = preset_of(ckpt, arch, PRESETS, PAPER_FILES, "xAR")
        with torch.device("meta"):
            return _model(XARNet(**kwargs), build_vae(KL16), kwargs)

    def evaluations(self, sampler: XARSampler) -> float:
        """num_steps calls per cell at the doubled batch of guidance, each over one of the four cells."""
        return 2.0 * sampler.num_steps

    def container(self, model: Model, state_dict: dict[str, torch.Tensor]) -> dict:
        return {"model_ema": state_dict, "arch": model.arch}


def _model(net: XARNet, vae: AutoencoderKL, arch: dict) -> Model:
    net.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    return Model(net=net, codec=vae, image_size=net.img_size, num_classes=net.num_classes, arch=dict(arch))


def _class_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 labels with −1 (and upstream's 1000) as the null class 1000; NeonError for others out of
    range."""
    labels = labels.to(torch.int64)
    null = (labels == -1) | (labels == NULL_CLASS)
    if ((labels < 0) | (labels >= num_classes))[~null].any():
        raise NeonError(
            f"class labels must be in [0, {num_classes}) for this xAR model, or -1 for the null class"
        )
    return torch.where(null, NULL_CLASS, labels)


def infer_arch(weights: dict[str, torch.Tensor], path: str = "checkpoint") -> dict:
    """Constructor kwargs of an xAR from its state dict: width from `z_proj`, depths from the block
    indices, head widths from the RoPE tables (4 × len(freqs)), the MLP ratio from the SwiGLU width;
    the rest (256 px, stride 16, 1000 classes, dropout 0.1) as upstream's models."""
    if "z_proj.weight" not in weights or "mask" not in weights:
        raise NeonError(f"{path} is not an xAR checkpoint (no z_proj.weight or mask); pass --model.arch")
    width = weights["z_proj.weight"].shape[0]
    kwargs = {**_COMMON, "encoder_embed_dim": width, "decoder_embed_dim": width}
    for part in ("encoder", "decoder"):
        blocks = {int(k.split(".")[1]) for k in weights if k.startswith(f"{part}_blocks.")}
        if not blocks:
            raise NeonError(f"{path}: no {part} blocks in the weights; pass --model.arch")
        head_dim = 4 * weights[f"{part}_blocks.0.attn.rope.freqs"].shape[0]
        kwargs[f"{part}_depth"], kwargs[f"{part}_num_heads"] = max(blocks) + 1, width // head_dim
    hidden = weights["encoder_blocks.0.mlp.fc1_g.weight"].shape[0]
    ratio = round(3 * hidden / width) / 2  # the nearest half, when it gives the same hidden width
    kwargs["mlp_ratio"] = ratio if int(width * ratio * 2 / 3) == hidden else 1.5 * hidden / width
    return kwargs


def build_vae(config: dict) -> AutoencoderKL:
    """An `AutoencoderKL` on the meta device for `config` (embed_dim, ch_mult, ch, num_res_blocks,
    use_variational); KL-16 is ch 128 with 2 res blocks, other widths replace its encoder and decoder."""
    ch_mult = tuple(config["ch_mult"])
    with torch.device("meta"):
        vae = AutoencoderKL(config["embed_dim"], ch_mult, config["use_variational"])
        if (config["ch"], config["num_res_blocks"]) != (128, 2):
            vae.encoder = Encoder(
                ch=config["ch"],
                ch_mult=ch_mult,
                num_res_blocks=config["num_res_blocks"],
                z_channels=config["embed_dim"],
            )
            vae.decoder = Decoder(
                ch=config["ch"],
                ch_mult=ch_mult,
                num_res_blocks=config["num_res_blocks"],
                z_channels=config["embed_dim"],
            )
    return vae


def infer_vae(weights: dict[str, torch.Tensor], path: str = "codec") -> dict:
    """`build_vae`'s config from a KL VAE state dict (kl16.ckpt gives embed_dim 16, ch_mult (1, 1, 2, 2, 4),
    ch 128, 2 res blocks)."""
    needed = ("encoder.conv_in.weight", "post_quant_conv.weight", "quant_conv.weight")
    if any(k not in weights for k in needed):
        raise NeonError(
            f"{path} is not a KL VAE checkpoint (no {', '.join(k for k in needed if k not in weights)})"
        )
    ch = weights["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(k.split(".")[2]) for k in weights if k.startswith("encoder.down.")})
    blocks = {int(k.split(".")[4]) for k in weights if k.startswith("encoder.down.0.block.")}
    embed_dim = weights["post_quant_conv.weight"].shape[0]
    if not levels or not blocks or levels != list(range(len(levels))):
        raise NeonError(f"{path}: cannot read the VAE's levels from its weights")
    return {
        "embed_dim": embed_dim,
        "ch_mult": [weights[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels],
        "ch": ch,
        "num_res_blocks": max(blocks) + 1,
        "use_variational": weights["quant_conv.weight"].shape[0] == 2 * embed_dim,
    }


def _load_vae(path: str) -> tuple[AutoencoderKL, int]:
    """The frozen VAE of `path` (strict) and its stride."""
    if not os.path.exists(path):
        raise NeonError(f"no KL-16 VAE checkpoint at {path}; pass --model.codec PATH (kl16.ckpt)")
    weights = checkpoint.read(path, CODEC_FORMAT).weights
    config = infer_vae(weights, path)
    if config["embed_dim"] != CHANNELS:
        raise NeonError(f"{path}: the VAE has {config['embed_dim']} latent channels; xAR needs {CHANNELS}")
    vae = load_built(build_vae(config), weights, path, "the KL-16 VAE")
    return vae.float(), 2 ** (len(config["ch_mult"]) - 1)


@functools.cache
def _reference_mask() -> torch.Tensor:
    """The block-causal mask every xAR builds (the smallest xAR that has one, built off the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        return xAR(
            encoder_embed_dim=4,
            encoder_depth=0,
            encoder_num_heads=1,
            decoder_embed_dim=4,
            decoder_depth=0,
            decoder_num_heads=1,
        ).mask


@functools.cache
def _reference_rope(head_dim: int) -> Rope2D:
    return Rope2D(head_dim)


ROPE_TOLERANCE = 1e-3  # a merge moves the tables by float32 rounding (~2e-7); other files are not xAR's


def _restore_constant_buffers(net: XARNet, incompatible_keys) -> None:
    """load_state_dict post-hook: check the loaded `mask` (exactly) and RoPE tables (within
    ROPE_TOLERANCE) against the constructor's values, then copy those in."""
    if net.mask.is_meta:
        return
    with torch.no_grad():
        if not torch.equal(net.mask.float().cpu(), _reference_mask()):
            raise NeonError("the xAR state dict holds a mask that is not xAR's block-causal mask")
        for name, module in net.named_modules():
            if isinstance(module, Rope2D):
                reference = _reference_rope(4 * module.freqs.shape[0])
                for buffer in ("freqs", "freqs_cos", "freqs_sin"):
                    loaded, value = getattr(module, buffer), getattr(reference, buffer)
                    gap = (loaded.float().cpu() - value).abs().max().item()
                    if not gap <= ROPE_TOLERANCE:
                        raise NeonError(
                            f"the xAR state dict's {name}.{buffer} differs from the RoPE table "
                            f"by {gap:.3g}; it is not an xAR checkpoint of this architecture"
                        )
                    loaded.copy_(value)
        net.mask.copy_(_reference_mask())


family = XARFamily()
