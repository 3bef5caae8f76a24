"""xAR sampling: cells one after another, each integrated with a guided Euler–Maruyama SDE.

Follows `OliverRensu/xAR:models/xar.py` (`xAR.sample_tokens`) and `models/sampler.py`
(`euler_maruyama_sampler`) @ 121e9c9; written anew. For cell s = 0..3, with guidance 1 + (cfg − 1)·s/3:

* draw the cell's noise x ~ N(0, I) [B, 64, 16] (float32), then keep the state x in float64;
* time grid linspace(1, 0.04, num_steps) followed by 0; steps 0..num_steps−2 are stochastic, each drawing
  ε [B, 64, 16] (float64) before its network call; the last step (0.04 → 0) draws nothing;
* the network always sees the doubled batch [x; x] with labels [y; 1000]. A cell's first step feeds
  [previous cell's clean tokens at t = 0; x] and extends the key/value cache by the clean cell; later
  steps feed x alone and read the cache;
* with v the velocity, score = ((t − 1)·v − x)/t, drift d = v − t·score, guided d = d_u + w·(d_c − d_u)
  (just d_c when w ≤ 1), update x += d·dt + sqrt(2t)·sqrt(|dt|)·ε (x += d·dt at the last step).

The time index of the noisy cell is trunc(1000·t) with t rounded to float32, the product taken in float64
at a cell's first step and in float32 after it, as upstream (the clean cell's index is 0).
"""

import math

import torch

from .models.vae import LATENT_SCALE
from .models.xar import CELL, CELLS, CHANNELS, NULL_CLASS, to_latent


def time_grid(num_steps: int) -> torch.Tensor:
    """float64 [num_steps + 1]: linspace(1, 0.04, num_steps), then 0."""
    return torch.cat(
        [torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]
    )


def per_sample_randn(generators):
    """A `randn(shape, dtype)` for `sample_tokens` whose row i comes from generators[i] alone (drawn on
    that generator's device), so sample i's draws do not depend on the rest of the batch."""

    def randn(shape, dtype):
        if shape[0] != len(generators):
            raise ValueError(f"a batch of {shape[0]} needs as many generators, got {len(generators)}")
        return torch.stack(
            [torch.randn(shape[1:], dtype=dtype, generator=g, device=g.device) for g in generators]
        )

    return randn


def _default_randn(shape, dtype):
    return torch.randn(shape, dtype=dtype)


def step_time_index(t: float, n: int, first: bool, device=None) -> torch.Tensor:
    """int64 [n] time index of the noisy cell at grid time t: trunc(1000·float32(t)), the product in
    float64 at a cell's first step (`first`) and in float32 otherwise, as upstream."""
    t32 = torch.tensor(t, dtype=torch.float32)
    index = int((t32.double() if first else t32) * 1000)
    return torch.full((n,), index, dtype=torch.long, device=device)


def em_step(
    v: torch.Tensor,
    x: torch.Tensor,
    t_cur: float,
    t_next: float,
    scale: float,
    eps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One guided Euler–Maruyama update.

    v [2B, 64, 16] network velocity (conditional rows first); x float64 [B, 64, 16] state at t_cur; scale the
    guidance weight; eps float64 [B, 64, 16], or None for the noiseless last step. Returns float64
    (drift [B, 64, 16], next state [B, 64, 16]).
    """
    v = v.double()
    x2 = torch.cat([x, x])
    drift = v - t_cur * (((t_cur - 1) * v - x2) / t_cur)
    cond, uncond = drift.chunk(2)
    drift = uncond + scale * (cond - uncond) if scale > 1 else cond
    dt = t_next - t_cur
    if eps is None:
        return drift, x + dt * drift
    return drift, x + drift * dt + math.sqrt(2 * t_cur) * (eps * math.sqrt(abs(dt)))


def sample_tokens(model, labels: torch.Tensor, num_steps: int, cfg: float, randn=None) -> torch.Tensor:
    """Sample xAR latents.

    model: an `xAR` (run in eval mode for the call, its mode restored after). labels int64 [B] (1000 =
    unconditional). num_steps ≥ 3 network calls per cell. cfg: guidance at the last cell.
    randn(shape, dtype): the source of every draw, called once per draw with the whole batch's shape, in
    the order of the module docstring; None = torch's default CPU generator (upstream's CPU draws).
    Returns float32 [B, 16, 16, 16], the latent at xAR scale (decode with `decode`).
    """
    if num_steps < 3:
        raise ValueError(
            f"xAR sampling needs num_steps >= 3, got {num_steps} (upstream fails at 1 and "
            "duplicates its key/value cache at 2)"
        )
    randn = randn or _default_randn
    device = model.mask.device
    labels = labels.to(device)
    B = labels.shape[0]
    labels2 = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
    grid = time_grid(num_steps).tolist()
    training = model.training
    model.eval()
    model.clear_cache()
    cells = []
    try:
        with torch.inference_mode():
            for s in range(CELLS):
                scale = 1 + (cfg - 1) * s / (CELLS - 1)
                x = randn((B, CELL, CHANNELS), torch.float32).to(device).double()
                for i in range(num_steps):
                    t_cur, t_next = grid[i], grid[i + 1]
                    eps = randn((B, CELL, CHANNELS), torch.float64).to(device) if i < num_steps - 1 else None
                    index = step_time_index(t_cur, 2 * B, i == 0, device)
                    inp = x.float()
                    if i == 0 and s > 0:
                        inp = torch.cat([cells[-1], inp], dim=1)
                        index = torch.cat([torch.zeros_like(index), index])
                    v = model.cell_velocity(torch.cat([inp, inp]), labels2, index, s, extend=i == 0)
                    _, x = em_step(v, x, t_cur, t_next, scale, eps)
                cells.append(x.float())
    finally:
        model.clear_cache()
        model.train(training)
    return to_latent(torch.cat(cells, dim=1))


def decode(vae, tokens: torch.Tensor) -> torch.Tensor:
    """xAR latent [B, 16, 16, 16] -> images [B, 3, 256, 256], roughly in [-1, 1]
    (`vae.decode(tokens/0.2325)`)."""
    return vae.decode(tokens / LATENT_SCALE)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 by Neon's conversion: (x + 1)/2·255, clamped to [0, 255], truncated
    (upstream xAR's eval rounds instead)."""
    return ((images.float() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)
