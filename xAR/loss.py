"""xAR's training loss: v-prediction flow matching with an independent time per (cell, sample).

Follows `xAR.forward` of `OliverRensu/xAR:models/xar.py` and the latent preparation of `engine_xar.py` /
`main_mar.py` @ 121e9c9, written anew. For cell c of sample b with time t = t[c·B + b]:
x_t = (1 − t)·x0 + t·ε, target ε − x0, loss = mean over samples of the per-sample mean of (v̂ − target)².

`flow_loss` takes every random quantity as an argument. `training_loss` draws them from one torch
generator: label-drop uniforms, then the four cells' noise (these two are upstream's torch draws, in its
order), then the 4B normals whose logistic sigmoid are the times (upstream draws those from numpy's global
RandomState instead).
"""

import torch

from .models.vae import LATENT_SCALE
from .models.xar import CELL, CELLS, CHANNELS, NULL_CLASS, to_tokens


def noisy_tokens(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 [B, 16, 16, 16] clean latent, t [4B] cell-major, noise [4, B, 64, 16] (noise[c] for cell c)
    -> (x_t, target), both [B, 256, 16] in cell-major token order."""
    B = x0.shape[0]
    x = to_tokens(x0).view(B, CELLS, CELL, CHANNELS)
    eps = noise.transpose(0, 1)
    t = t.view(CELLS, B).t()[:, :, None, None]
    x_t = (1 - t) * x + t * eps
    return x_t.reshape(B, -1, CHANNELS), (eps - x).reshape(B, -1, CHANNELS)


def flow_loss(
    model, x0: torch.Tensor, labels: torch.Tensor, drop: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Scalar float32 loss for supplied draws.

    x0 float32 [B, 16, 16, 16] clean latent (VAE sample × 0.2325); labels int64 [B] before dropout;
    drop bool [B] (True -> null class 1000); t float32 [4B] cell-major; noise float32 [4, B, 64, 16].
    """
    x_t, target = noisy_tokens(x0, t, noise)
    v = model.velocity(x_t, t, torch.where(drop, NULL_CLASS, labels))
    return (v - target).pow(2).mean(dim=(1, 2)).mean()


def draw_flow_inputs(
    batch: int, label_drop_prob: float, generator: torch.Generator | None = None, device=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(drop bool [B], t float32 [4B], noise float32 [4, B, 64, 16]) drawn from `generator` (torch's
    default CPU generator when None), on the generator's device, returned on `device`.

    Order: rand(B) < label_drop_prob; four randn(B, 64, 16), cell 0 first; randn(4B) in float64,
    t = float32(sigmoid) (logit-normal times).
    """
    gen_device = generator.device if generator is not None else "cpu"
    drop = torch.rand(batch, generator=generator, device=gen_device) < label_drop_prob
    noise = torch.stack(
        [torch.randn(batch, CELL, CHANNELS, generator=generator, device=gen_device) for _ in range(CELLS)]
    )
    z = torch.randn(CELLS * batch, generator=generator, device=gen_device, dtype=torch.float64)
    t = torch.sigmoid(z).float()
    return drop.to(device), t.to(device), noise.to(device)


def training_loss(
    model, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`flow_loss` with drop/t/noise from `draw_flow_inputs(B, model.label_drop_prob, generator)`.
    Dropout inside the network (attn_dropout, proj_dropout) draws from torch's global generator."""
    drop, t, noise = draw_flow_inputs(x0.shape[0], model.label_drop_prob, generator, x0.device)
    return flow_loss(model, x0, labels, drop, t, noise)


def uint8_to_pm1(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 in [-1, 1] as torchvision's ToTensor then Normalize(0.5, 0.5)."""
    return images.float().div(255).sub(0.5).div(0.5)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 training latent [B, 16, H/16, W/16] = posterior sample × 0.2325.

    Each image is flipped horizontally with probability 1/2 (upstream's RandomHorizontalFlip); draws from
    `generator` (default CPU generator when None): first rand(B) for the flips, then the posterior noise.
    """
    gen_device = generator.device if generator is not None else "cpu"
    flip = (torch.rand(images.shape[0], generator=generator, device=gen_device) < 0.5).to(images.device)
    x = uint8_to_pm1(images)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return vae.encode(x).sample(generator) * LATENT_SCALE
