"""VAR's training loss: teacher-forced cross-entropy over the whole token pyramid.

Mirrors the loss of `VARTrainer.train_step` in `FoundationVision/VAR:trainer.py` and the data pipeline of
`utils/data.py` @ 78b95394 (MIT License, Copyright (c) 2024 FoundationVision), written anew, without
progressive training (Neon never uses it). Upstream's data pipeline for (fine-)tuning resizes the shorter
side to round(1.125·res) with Lanczos, crops res x res at random (centre crop for validation), no flip,
then maps [0, 1] to [-1, 1]: `augment` and `uint8_to_pm1`; `training_loss` chains them.
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .models import VAR, VQVAE

# Upstream's training pipeline: shorter side to round(1.125 · res) with Lanczos, then a random crop.
RESIZE_RATIO = 1.125


def training_loss(
    var: VAR, vae: VQVAE, images_u8: torch.Tensor, label_B: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The fine-tuning loss on uint8 [B, 3, H, W] images: `augment` (crop offsets from `generator`),
    then the teacher-forced cross-entropy; label drop and drop-path draw from torch's global generator."""
    images = uint8_to_pm1(augment(images_u8.cpu(), generator)).to(images_u8.device)
    return teacher_forcing_loss(var, vae, images, label_B)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 [B,3,H,W] → uint8 [B,3,H,W]: resize to round(1.125·H) with Lanczos (PIL, as upstream's
    torchvision pipeline does), then crop H×W at an offset drawn from `generator`."""
    size = images.shape[-1]
    big = round(RESIZE_RATIO * size)
    resized = np.stack(
        [
            np.asarray(Image.fromarray(img).resize((big, big), Image.LANCZOS))
            for img in images.permute(0, 2, 3, 1).numpy()
        ]
    )
    offsets = torch.randint(0, big - size + 1, (len(images), 2), generator=generator)
    rows = offsets[:, 0, None] + torch.arange(size)
    cols = offsets[:, 1, None] + torch.arange(size)
    batch = torch.arange(len(images))[:, None, None]
    crops = torch.from_numpy(resized)[batch, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()


def uint8_to_pm1(img_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 in [-1, 1], exactly as torchvision's ToTensor then upstream's
    x + x - 1."""
    x = img_u8.float().div(255)
    return x.add(x).add_(-1)


def teacher_forcing_loss(
    var: VAR, vae: VQVAE, img_B3HW: torch.Tensor, label_B: torch.Tensor, label_smooth: float = 0.0
) -> torch.Tensor:
    """Scalar float32 loss: mean over the batch of Σ_j CE(logits_j, token_j; label_smooth) / L.

    img_B3HW: float32 [B, 3, H, W] in [-1, 1], H = W = 16·patch_nums[-1]. label_B: int64 [B]. The tokens come
    from the frozen VQ-VAE (no gradient) in float32 outside any autocast, as upstream's trainer tokenizes
    before its autocast block (fp16 could flip codes and overflow the encoder); gradients flow into `var`
    only.
    Randomness: torch's global generator, drawn inside `var.forward` (label dropout, then drop-path).
    """
    with torch.no_grad(), torch.autocast(img_B3HW.device.type, enabled=False):
        gt_idx_Bl = vae.img_to_idxBl(img_B3HW.float())
        gt_BL = torch.cat(gt_idx_Bl, dim=1)
        x_BLCv_wo_first_l = vae.quantize.idxBl_to_var_input(gt_idx_Bl)
    logits_BLV = var(label_B, x_BLCv_wo_first_l)
    B, L, V = logits_BLV.shape
    ce_BL = F.cross_entropy(
        logits_BLV.view(-1, V), gt_BL.view(-1), label_smoothing=label_smooth, reduction="none"
    ).view(B, L)
    # Upstream weighs positions by a float32 tensor of 1/L, rather than dividing the sum by L.
    weight_1L = torch.ones(1, L, device=ce_BL.device) / L
    return ce_BL.mul(weight_1L).sum(dim=-1).mean()
