"""The VAR family's adapter to the core (`neon.family.Family`).

θ is the VAR transformer (VAR keeps no EMA); the VQ-VAE is a frozen codec read from its own file
(`--model.codec`, default `checkpoints/vae_ch160v4096z32.pth`) and never merged. Transformer
checkpoints are read flat (`var_d16.pth`, the authors' `Neon_VARd*.pth`), as `{'var_wo_ddp': …}` or
as `{'trainer': {'var_wo_ddp': …}}`; the architecture is read from the file's `arch`, from
`--model.arch`, or from the weights themselves (number of blocks, sequence length, shared AdaLN).
The causal mask buffer holds −inf, so the merge copies it from the base.

Sampling is `autoregressive_infer_cfg` with one generator per sample, seeded with its seed, so a
sample does not depend on its batch. The generators live on the model's device, the one exception to
the core's CPU-generator rule (`neon.family.Family.sample`): each scale draws its tokens from the
logits there (top-k/top-p over a 4096-token vocabulary for every position), and moving the logits to
the CPU at every scale would cost more than the sampling; so a seed's draws differ between the CPU
and CUDA, and the GPU checks compare greedy decoding (top_k=1), which draws nothing that matters.
Fine-tuning follows upstream's trainer: images resized to
1.125× with Lanczos and cropped at random, 10 % label drop to the null class, teacher-forced
cross-entropy over all tokens.
"""

import dataclasses
import os

import torch

from neon.errors import NeonError
from neon.family import Model, arch_kwargs, check_finite, load_built, preset_of, read_checkpoint
from neon.io import checkpoint
from VAR.loss import augment, teacher_forcing_loss, training_loss, uint8_to_pm1
from VAR.models import build_vae_var

DEFAULT_CODEC = os.path.join("checkpoints", "vae_ch160v4096z32.pth")
_COMMON = {"V": 4096, "Cvae": 32, "ch": 160, "share_quant_resi": 4, "num_classes": 1000, "attn_l2_norm": True}
PATCH_NUMS = {256: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16], 512: [1, 2, 3, 4, 6, 9, 13, 18, 24, 32]}
PRESETS = {
    **{
        f"d{d}": {**_COMMON, "depth": d, "shared_aln": False, "patch_nums": PATCH_NUMS[256]}
        for d in (16, 20, 24, 30)
    },
    "d36": {**_COMMON, "depth": 36, "shared_aln": True, "patch_nums": PATCH_NUMS[512]},
}
PAPER_FILES = {f"var_d{d}.pth": f"d{d}" for d in (16, 20, 24, 30, 36)}
TINY = {
    "V": 64,
    "Cvae": 8,
    "ch": 32,
    "share_quant_resi": 4,
    "num_classes": 10,
    "attn_l2_norm": True,
    "depth": 2,
    "shared_aln": False,
    "patch_nums": [1, 2, 4],
}


@dataclasses.dataclass(frozen=True)
class VARSampler:
    """`autoregressive_infer_cfg` settings: guidance ramped over scales up to `cfg`, top-k/top-p."""

    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.95
    more_smooth: bool = False

    def __post_init__(self):
        if self.top_k < 0 or not 0 <= self.top_p <= 1:
            raise NeonError("sampler: need top_k >= 0 and 0 <= top_p <= 1")


# Transformer files: flat (var_d16.pth, Neon_VARd*.pth), the trainer's wrappings, our snapshots and
# those of the first core ({'model', 'ema'}).
FORMAT = checkpoint.Format(weight_keys=((), ("var_wo_ddp",), ("trainer", "var_wo_ddp"), ("ema",), ("model",)))


class VARFamily:
    name = "var"
    Sampler = VARSampler
    format = FORMAT

    def tiny(self, seed: int) -> Model:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae, var = build_vae_var("cpu", **TINY)
        return self._model(vae, var, TINY)

    def load(
        self, path: str, arch: str | None = None, device: torch.device | str = "cpu", codec: str | None = None
    ) -> Model:
        container = read_checkpoint(self, path)
        weights = container.weights
        kwargs = arch_kwargs(container, arch, PRESETS, "VAR") or infer_arch(weights, path)
        codec = codec or DEFAULT_CODEC
        if not os.path.exists(codec):
            raise NeonError(
                f"no VQ-VAE checkpoint at {codec}; pass --model.codec PATH (vae_ch160v4096z32.pth)"
            )
        vae, var = build_vae_var("meta", **kwargs)
        vae = load_built(vae, checkpoint.read(codec).weights, codec, "the VQ-VAE", device)
        return self._model(vae, load_built(var, weights, path, f"VAR d{kwargs.get('depth')}", device), kwargs)

    def sample(
        self, model: Model, labels: torch.Tensor, seeds: torch.Tensor, sampler: VARSampler
    ) -> torch.Tensor:
        var = model.net
        device = next(var.parameters()).device
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=device.type == "cuda"):
            images = var.autoregressive_infer_cfg(
                len(seeds),
                labels.to(device),
                cfg=sampler.cfg,
                top_k=sampler.top_k,
                top_p=sampler.top_p,
                more_smooth=sampler.more_smooth,
                generators=generators,
            )
        # Upstream Neon's conversion (truncation, not rounding).
        return (check_finite(images.float(), "VAR sampler").clamp(0, 1) * 255).to(torch.uint8)

    def loss(
        self, model: Model, samples: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Teacher-forced cross-entropy on the augmented batch; label drop and drop-path draw from the
        global RNG, which the fine-tune loop reseeds at every step. `samples`: uint8 images, or the
        float images `prepare` made of them (then `generator` has drawn the crops already)."""
        if samples.is_floating_point():
            return teacher_forcing_loss(model.net, model.codec, samples, labels)
        return training_loss(model.net, model.codec, samples, labels, generator)

    def prepare(self, samples: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The CPU side of `loss`: the Lanczos resize and the random crop (offsets from `generator`),
        then [-1, 1]: float32 [B, 3, H, W]."""
        return uint8_to_pm1(augment(samples.cpu(), generator))

    def full_size(self, ckpt: str | None, arch: str | None) -> Model:
        kwargs = preset_of(ckpt, arch, PRESETS, PAPER_FILES, "VAR")
        with torch.device("meta"):
            vae, var = build_vae_var("meta", **kwargs)
        return self._model(vae, var, kwargs)

    def evaluations(self, sampler: VARSampler) -> float:
        """One cached pass over the token pyramid, at the doubled batch of guidance (always run)."""
        return 2.0

    def container(self, model: Model, state_dict: dict[str, torch.Tensor]) -> dict:
        return {"arch": model.arch, "var_wo_ddp": state_dict}

    @staticmethod
    def _model(vae, var, arch: dict) -> Model:
        vae.eval().requires_grad_(False)
        var.eval().requires_grad_(False)
        return Model(
            net=var,
            codec=vae,
            image_size=16 * var.patch_nums[-1],
            num_classes=var.num_classes,
            arch=dict(arch),
        )


def infer_arch(weights: dict[str, torch.Tensor], path: str = "checkpoint") -> dict:
    """Build kwargs of an official-size VAR from its weights: depth = number of blocks, the
    resolution from the sequence length, shared AdaLN from its keys."""
    blocks = {int(k.split(".")[1]) for k in weights if k.startswith("blocks.")}
    if not blocks or "pos_1LC" not in weights:
        raise NeonError(f"{path} is not a VAR transformer checkpoint; pass --model.arch")
    length = weights["pos_1LC"].shape[1]
    for patch_nums in PATCH_NUMS.values():
        if sum(p * p for p in patch_nums) == length:
            return {
                **_COMMON,
                "depth": max(blocks) + 1,
                "patch_nums": patch_nums,
                "shared_aln": any(k.startswith("shared_ada_lin.") for k in weights),
                "num_classes": weights["class_emb.weight"].shape[0] - 1,
            }
    raise NeonError(f"{path}: sequence length {length} matches no known resolution; pass --model.arch")


family = VARFamily()
