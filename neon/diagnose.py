"""Will Neon help, and with which sign of w? The anti-alignment diagnostic of the Neon paper.

Fine-tuning on S moves θ by about −α P g_s (g_s: the gradient of the loss on S at θ, P: Adam's
diagonal preconditioner), so θ_neon − θ ≈ w α P g_s and the real risk changes by about
w α ⟨g_d, P g_s⟩, g_d being the gradient on real data. Its sign is that of

    cos_P = ⟨g_d, P g_s⟩ / (‖g_d‖_P ‖g_s‖_P),      ‖g‖_P² = ⟨g, P g⟩,

and Neon lowers the real risk for small w > 0 when cos_P < 0 (mode-seeking samplers), for w < 0
when cos_P > 0. This module estimates cos_P with any family's own loss: g_d and g_s are means of
per-batch gradients, P = 1 / (√v̂ + ε) from Adam's bias-corrected second moment, and a bootstrap
over batches gives an interval.

P is estimated over the real and the synthetic batches together by default. Estimated on real
batches alone (as the paper's notebook does), P is 1/ε = 1e8 on weights of ReLU units that no real
point activates; synthetic points from a broad sampler do activate them, and those few coordinates
then swamp ‖g_s‖_P (the toy AR model at τ > 1 reads |cos_P| ≈ 0.001 that way instead of ≈ 0.3).
"""

import dataclasses
import logging

import torch

from neon import precision
from neon.errors import NeonError

logger = logging.getLogger(__name__)

ADVICE = {"extrapolate": "extrapolate: Neon with w > 0 should help",
          "interpolate": "interpolate: w < 0 (training on S) should help",
          "inconclusive": "inconclusive: the interval contains 0"}


@dataclasses.dataclass(frozen=True)
class DiagnoseConfig:
    batches: int = 16
    """Batches each of the real and the synthetic data are cut into (bootstrap units)."""
    repeats: int = 1
    """Loss draws (noise levels, noise) averaged per batch: more for noisy losses such as diffusion."""
    preconditioner: str = "pooled"
    """Where Adam's second moment comes from: pooled (real and synthetic batches), real or synthetic."""
    beta2: float = 0.999
    eps: float = 1e-8
    bootstrap: int = 2000
    """Bootstrap resamples for the 95% interval."""
    seed: int = 0

    def __post_init__(self):
        if self.batches < 2 or self.repeats < 1 or self.bootstrap < 1:
            raise NeonError("diagnose: need batches >= 2, repeats >= 1 and bootstrap >= 1")
        if self.preconditioner not in ("pooled", "real", "synthetic"):
            raise NeonError(
                f"diagnose: preconditioner must be pooled, real or synthetic, got {self.preconditioner!r}"
            )


def batch_gradients(family, model, samples, labels: torch.Tensor, batches: int, repeats: int,
                    seed: int) -> torch.Tensor:
    """float32 [batches, P]: the flattened gradient of the family's loss on each of `batches` equal
    parts of the data at the model's current weights (random draws of batch k from seed + k).
    `samples`: a tensor in the family's sample format, or a `neon.synthetic.SyntheticSet`, read one
    batch at a time."""
    precision.apply("finetune")
    if len(samples) < batches:
        raise NeonError(f"diagnose: {len(samples)} samples cannot make {batches} batches")
    net = model.net
    params = [p for p in net.parameters()]
    was_training = net.training
    net.train().requires_grad_(True)
    device = params[0].device
    grads = []
    parts = torch.arange(len(samples)).chunk(batches)
    for k, index in enumerate(parts):
        x = samples[index] if isinstance(samples, torch.Tensor) else samples.read(index)
        # samples drawn in inference mode cannot enter autograd as they are
        x, y = x.clone(), labels[index].clone()
        generator = torch.Generator().manual_seed(seed + k)
        net.zero_grad(set_to_none=True)
        for _ in range(repeats):
            (family.loss(model, x.to(device), y.to(device), generator) / repeats).backward()
        grads.append(
            torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float().cpu()
                    for p in params
                ]
            )
        )
    net.zero_grad(set_to_none=True)
    net.train(was_training).requires_grad_(False)
    return torch.stack(grads)


def adam_preconditioner(grads: torch.Tensor, beta2: float = 0.999, eps: float = 1e-8) -> torch.Tensor:
    """P = 1 / (√v̂ + ε) with v̂ Adam's bias-corrected EMA of g² over the rows of `grads` [K, P]."""
    v = torch.zeros(grads.shape[1], dtype=torch.float64)
    for g in grads.double():
        v.mul_(beta2).add_(g * g, alpha=1 - beta2)
    return 1.0 / ((v / (1 - beta2 ** len(grads))).sqrt() + eps)


def cosine(
    real_grads: torch.Tensor,
    synthetic_grads: torch.Tensor,
    precond: torch.Tensor,
    bootstrap: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(cos_P of the mean gradients, 2.5% and 97.5% bootstrap quantiles over batches)."""
    d, s, p = real_grads.double(), synthetic_grads.double(), precond.double()
    # Gram matrices in the P inner product: every resample's cosine is a quadratic form in them.
    dd, ss, ds = (d * p) @ d.T, (s * p) @ s.T, (d * p) @ s.T

    def cos(u, v):  # u [n, K_d], v [n, K_s]: batch weights summing to 1
        num = ((u @ ds) * v).sum(1)
        return num / (((u @ dd) * u).sum(1).sqrt() * ((v @ ss) * v).sum(1).sqrt())

    k_d, k_s = len(d), len(s)
    point = cos(
        torch.full((1, k_d), 1 / k_d, dtype=torch.float64), torch.full((1, k_s), 1 / k_s, dtype=torch.float64)
    )
    generator = torch.Generator().manual_seed(seed)
    u = (
        torch.zeros(bootstrap, k_d, dtype=torch.float64).scatter_add_(
            1,
            torch.randint(k_d, (bootstrap, k_d), generator=generator),
            torch.ones(bootstrap, k_d, dtype=torch.float64),
        )
        / k_d
    )
    v = (
        torch.zeros(bootstrap, k_s, dtype=torch.float64).scatter_add_(
            1,
            torch.randint(k_s, (bootstrap, k_s), generator=generator),
            torch.ones(bootstrap, k_s, dtype=torch.float64),
        )
        / k_s
    )
    low, high = torch.quantile(cos(u, v), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return point.item(), low, high


def run(family, model, real: tuple[torch.Tensor, torch.Tensor], synthetic: tuple[torch.Tensor, torch.Tensor],
        conf: DiagnoseConfig) -> dict:
    """cos_P of real data (samples, labels) against a synthetic set, with its interval and advice."""
    d = batch_gradients(family, model, *real, conf.batches, conf.repeats, conf.seed)
    s = batch_gradients(family, model, *synthetic, conf.batches, conf.repeats, conf.seed + 1_000_003)
    pool = {"real": d, "synthetic": s, "pooled": torch.stack([g for pair in zip(d, s) for g in pair])}
    precond = adam_preconditioner(pool[conf.preconditioner], conf.beta2, conf.eps)
    cos_p, low, high = cosine(d, s, precond, conf.bootstrap, conf.seed)
    advice = "extrapolate" if high < 0 else "interpolate" if low > 0 else "inconclusive"
    return {"cos_p": cos_p, "low": low, "high": high, "advice": advice}
