"""The VAR family's adapter to the core (`neon.family.Family`).

θ is the VAR transformer (VAR keeps no EMA); the VQ-VAE is a frozen codec read from its own file
(`--model.codec`, default `checkpoints/vae_ch160v4096z32.pth`) and never merged. Transformer
checkpoints are read flat (`var_d16.pth`, the authors' `Neon_VARd*.pth`), as `{'var_wo_ddp': …}` or
as `{'trainer': {'var_wo_ddp': …}}`; the architecture is read from the file's `arch`, from
`--model.arch`, or from the weights themselves (number of blocks, sequence length, shared AdaLN).
The causal mask buffer holds −inf, so the merge copies it from the base.

Sampling is `autoregressive_infer_cfg` with one generator per sample, seeded with its seed, so a
sample does not depend on its batch. Fine-tuning follows upstream's trainer: images resized to
1.125× with Lanczos and cropped at random, 10 % label drop to the null class, teacher-forced
cross-entropy over all tokens.
"""

import dataclasses
import os

import numpy as np
import torch
from PIL import Image

from neon import checkpoint
from neon.errors import NeonError
from neon.family import Model, arch_kwargs

from VAR.loss import teacher_forcing_loss, uint8_to_pm1
from VAR.models import build_vae_var

DEFAULT_CODEC = os.path.join("checkpoints", "vae_ch160v4096z32.pth")
_COMMON = {"V": 4096, "Cvae": 32, "ch": 160, "share_quant_resi": 4, "num_classes": 1000, "attn_l2_norm": True}
PATCH_NUMS = {256: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16], 512: [1, 2, 3, 4, 6, 9, 13, 18, 24, 32]}
PRESETS = {
    **{f"d{d}": {**_COMMON, "depth": d, "shared_aln": False, "patch_nums": PATCH_NUMS[256]} for d in (16, 20, 24, 30)},
    "d36": {**_COMMON, "depth": 36, "shared_aln": True, "patch_nums": PATCH_NUMS[512]},
}
TINY = {"V": 64, "Cvae": 8, "ch": 32, "share_quant_resi": 4, "num_classes": 10, "attn_l2_norm": True, "depth": 2,
        "shared_aln": False, "patch_nums": [1, 2, 4]}
# Upstream's training pipeline: shorter side to round(1.125 · res) with Lanczos, then a random crop.
RESIZE_RATIO = 1.125


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


class VARFamily:
    name = "var"
    Sampler = VARSampler

    def tiny(self, seed: int) -> Model:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae, var = build_vae_var("cpu", **TINY)
        return self._model(vae, var, TINY)

    def load(self, path: str, arch: str | None = None, device: torch.device | str = "cpu",
             codec: str | None = None) -> Model:
        container = checkpoint.read(path)
        weights = self.weights(container)
        kwargs = arch_kwargs(container, arch, PRESETS, "VAR") or infer_arch(weights, path)
        codec = codec or DEFAULT_CODEC
        if not os.path.exists(codec):
            raise NeonError(f"no VQ-VAE checkpoint at {codec}; pass --model.codec PATH (vae_ch160v4096z32.pth)")
        vae, var = build_vae_var("meta", **kwargs)
        try:
            vae.load_state_dict(checkpoint.read(codec).weights, strict=True, assign=True)
            var.load_state_dict(weights, strict=True, assign=True)
        except RuntimeError as e:
            raise NeonError(f"{path} / {codec} do not fit VAR {kwargs.get('depth')}: {str(e).splitlines()[0]}") from None
        return self._model(vae.to(device), var.to(device), kwargs)

    def sample(self, model: Model, labels: torch.Tensor, seeds: torch.Tensor, sampler: VARSampler) -> torch.Tensor:
        var = model.net
        device = next(var.parameters()).device
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=device.type == "cuda"):
            images = var.autoregressive_infer_cfg(len(seeds), labels.to(device), cfg=sampler.cfg, top_k=sampler.top_k,
                                                  top_p=sampler.top_p, more_smooth=sampler.more_smooth,
                                                  generators=generators)
        # Upstream Neon's conversion (truncation, not rounding).
        return (images.float().clamp(0, 1) * 255).to(torch.uint8)

    def trainable(self, model: Model) -> torch.nn.Module:
        return model.net

    def loss(self, model: Model, samples: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        """Teacher-forced cross-entropy on the augmented batch; label drop and drop-path draw from the
        global RNG, which the fine-tune loop reseeds at every step."""
        images = uint8_to_pm1(augment(samples.cpu(), generator)).to(samples.device)
        return teacher_forcing_loss(model.net, model.codec, images, labels)

    def weights(self, container) -> dict[str, torch.Tensor]:
        return container.weights

    def save(self, state_dict: dict[str, torch.Tensor], path: str, like) -> None:
        """`like` is a container to mirror, or a Model for a fresh `{'arch', 'var_wo_ddp'}` file."""
        if isinstance(like, Model):
            checkpoint.write({"arch": like.arch, "var_wo_ddp": state_dict}, path)
        else:
            checkpoint.write_like(like, state_dict, path)

    def features(self, samples: torch.Tensor) -> torch.Tensor:
        from neon.metrics import inception

        return inception.pool_features(samples)

    def reference(self):
        return None

    @staticmethod
    def _model(vae, var, arch: dict) -> Model:
        vae.eval().requires_grad_(False)
        var.eval().requires_grad_(False)
        return Model(net=var, codec=vae, image_size=16 * var.patch_nums[-1], num_classes=var.num_classes,
                     arch=dict(arch))


def infer_arch(weights: dict[str, torch.Tensor], path: str = "checkpoint") -> dict:
    """Build kwargs of an official-size VAR from its weights: depth = number of blocks, the
    resolution from the sequence length, shared AdaLN from its keys."""
    blocks = {int(k.split(".")[1]) for k in weights if k.startswith("blocks.")}
    if not blocks or "pos_1LC" not in weights:
        raise NeonError(f"{path} is not a VAR transformer checkpoint; pass --model.arch")
    length = weights["pos_1LC"].shape[1]
    for patch_nums in PATCH_NUMS.values():
        if sum(p * p for p in patch_nums) == length:
            return {**_COMMON, "depth": max(blocks) + 1, "patch_nums": patch_nums,
                    "shared_aln": any(k.startswith("shared_ada_lin.") for k in weights),
                    "num_classes": weights["class_emb.weight"].shape[0] - 1}
    raise NeonError(f"{path}: sequence length {length} matches no known resolution; pass --model.arch")


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 [B,3,H,W] → uint8 [B,3,H,W]: resize to round(1.125·H) with Lanczos (PIL, as upstream's
    torchvision pipeline does), then crop H×W at an offset drawn from `generator`."""
    size = images.shape[-1]
    big = round(RESIZE_RATIO * size)
    resized = np.stack([np.asarray(Image.fromarray(img).resize((big, big), Image.LANCZOS))
                        for img in images.permute(0, 2, 3, 1).numpy()])
    offsets = torch.randint(0, big - size + 1, (len(images), 2), generator=generator)
    rows = offsets[:, 0, None] + torch.arange(size)
    cols = offsets[:, 1, None] + torch.arange(size)
    batch = torch.arange(len(images))[:, None, None]
    crops = torch.from_numpy(resized)[batch, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()


family = VARFamily()
