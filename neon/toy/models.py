"""The two toy generators, their samplers and losses.

Mirrors the networks of `SinaAlemohammad/Neon:toy_appendix.ipynb` (architectures and training
settings of the paper's appendix); the samplers are written here: a correct DDIM with η as a parameter (η = 0
deterministic, η = 1 stochastic) and, next to it, the notebook's own deterministic sampler
(`EpsMLP.sample_notebook`), which produced the appendix's figures.

Diffusion: `EpsMLP` predicts ε from (x1, x2, t/T); cosine schedule (s = 0.008, T = 1000); the DDIM
sampler scales the predicted score by ζ (ζ > 1 mode-seeking, ζ < 1 diversity-seeking).
AR: x1 ~ N(μ, σ²) with free μ, log σ; x2 | x1 ~ N(m(x1), s(x1)²) from an MLP; sampling multiplies
both standard deviations by a temperature τ (τ < 1 mode-seeking).

All sampling noise of sample i comes from `neon.rng` keyed by `seeds[i]`.
"""

import math

import torch
from torch import nn

from neon import rng

TRUE_MEAN = (0.0, 0.0)
TRUE_COV = ((2.0, 1.0), (1.0, 2.0))


def true_samples(num: int, seed: int) -> torch.Tensor:
    """float32 [num, 2] points from the target N(0, [[2,1],[1,2]]), row i keyed by seed + i."""
    z = rng.normal(torch.arange(num) + seed, (2,), stream=7, dtype=torch.float64)
    chol = torch.linalg.cholesky(torch.tensor(TRUE_COV, dtype=torch.float64))
    return (z @ chol.T + torch.tensor(TRUE_MEAN, dtype=torch.float64)).float()


def cosine_alpha_bar(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """float64 [timesteps]: ᾱ_t = f(t/T) / f(0), f(u) = cos²((u + s)/(1 + s) · π/2), t = 0 … T−1
    (Nichol & Dhariwal 2021, Eq. 17; ᾱ_0 = 1)."""
    u = torch.arange(timesteps, dtype=torch.float64) / timesteps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return f / f[0]


class EpsMLP(nn.Module):
    """ε-prediction network: Linear 3→hidden, `depth` × (Linear hidden→hidden + ReLU), Linear
    hidden→2. Input x float32 [B, 2] and t [B] in [0, timesteps) (int64 in training; the notebook
    sampler also passes fractional times)."""

    def __init__(self, hidden: int = 32, depth: int = 4, timesteps: int = 1000):
        super().__init__()
        self.timesteps = timesteps
        self.inp = nn.Linear(3, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, 2)
        self.register_buffer("alpha_bar", cosine_alpha_bar(timesteps).float(), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.inp(torch.cat([x, (t.to(x.dtype) / self.timesteps)[:, None]], dim=1))
        for block in self.blocks:
            h = torch.relu(block(h))
        return self.out(h)

    def sample(
        self, seeds: torch.Tensor, zeta: float = 1.0, steps: int = 20, eta: float = 0.0
    ) -> torch.Tensor:
        """DDIM (Song et al. 2021, Eq. 12) over `steps` of the T training steps, t = T − T/steps … 0,
        with the predicted ε (hence the score −ε/√(1−ᾱ)) scaled by ζ. η = 0 is deterministic; η = 1
        is the DDPM posterior variance. Returns float32 [B, 2]."""
        t_seq = [round(self.timesteps * k / steps) for k in range(steps - 1, -1, -1)]
        a_bar = self.alpha_bar.double()
        x = rng.normal(seeds, (2,), stream=0)
        for i, t in enumerate(t_seq):
            a_t = a_bar[t]
            a_prev = a_bar[t_seq[i + 1]] if i + 1 < len(t_seq) else a_bar.new_ones(())
            eps = zeta * self(x, torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)).double()
            x0 = (x.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            sigma = a_bar.new_zeros(())
            if eta > 0 and t > 0:
                sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
            if sigma > 0:
                x = x + sigma * rng.normal(seeds, (2,), stream=1 + i, dtype=torch.float64)
            x = x.float()
        return x

    def sample_notebook(self, seeds: torch.Tensor, zeta: float = 1.0, steps: int = 20) -> torch.Tensor:
        """The sampler of the appendix notebook (`sample_diffusion`), kept for its figures. It differs
        from DDIM in three ways: it builds a fresh `steps`-step cosine schedule ᾱ'_k (k = 0 … steps−1)
        while feeding the network the time k/(steps−1) of the T-step schedule it was trained on; ζ
        scales ε only where x0 is predicted, not in the direction term; and its "η = 1" variance has
        the factor 1 − α'_k/ᾱ'_k = 1 − 1/ᾱ'_{k−1} < 0 (α'_k = ᾱ'_k/ᾱ'_{k−1}), clipped to 0, so it is
        deterministic. The k = 0 step is the identity
        (ᾱ'_0 = 1). Returns float32 [B, 2]."""
        if steps < 2:
            raise ValueError("the notebook sampler needs steps >= 2")
        x = rng.normal(seeds, (2,), stream=0, dtype=torch.float64)
        a_bar = cosine_alpha_bar(steps).to(x.device)
        for k in range(steps - 1, 0, -1):
            time = torch.full(
                (x.shape[0],), k * self.timesteps / (steps - 1), dtype=torch.float32, device=x.device
            )
            eps = self(x.float(), time).double()
            x0 = (x - zeta * (1 - a_bar[k]).sqrt() * eps) / a_bar[k].sqrt()
            x = a_bar[k - 1].sqrt() * x0 + (1 - a_bar[k - 1]).sqrt() * eps
        return x.float()


class GaussianAR(nn.Module):
    """p(x1) = N(mu, exp(log_std)²); p(x2 | x1) = N(m, exp(ℓ)²) with (m, ℓ) = MLP(x1),
    MLP 1→hidden→hidden→2 with ReLU, ℓ clamped to [−6, 3]."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(1))
        self.log_std = nn.Parameter(torch.zeros(1))
        self.cond = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 2))

    def _conditional(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.cond(x1[:, None])
        return out[:, 0], out[:, 1].clamp(-6.0, 3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each point x [B, 2] (constant terms dropped): float32 [B]."""
        m, log_s = self._conditional(x[:, 0])
        nll1 = self.log_std + 0.5 * ((x[:, 0] - self.mu) / self.log_std.exp()).square()
        nll2 = log_s + 0.5 * ((x[:, 1] - m) / log_s.exp()).square()
        return nll1 + nll2

    def sample(self, seeds: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
        """Ancestral sampling with both standard deviations multiplied by τ. Returns float32 [B, 2]."""
        z = rng.normal(seeds, (2,), stream=0)
        x1 = self.mu + tau * self.log_std.exp() * z[:, 0]
        m, log_s = self._conditional(x1)
        x2 = m + tau * log_s.exp() * z[:, 1]
        return torch.stack([x1, x2], dim=1)


ARCHS = {"diffusion": EpsMLP, "ar": GaussianAR}


def diffusion_loss(net: nn.Module, x0: torch.Tensor, generator: torch.Generator,
                   timesteps: int = 1000) -> torch.Tensor:
    """The DDPM ε-prediction loss (mean squared error) of `net` (an EpsMLP, possibly DDP-wrapped:
    it is only called) on clean points x0 [B, 2]; t and ε drawn from `generator` (a CPU generator:
    the draws are made on the CPU, then moved to x0's device)."""
    t = torch.randint(0, timesteps, (x0.shape[0],), generator=generator)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    a = cosine_alpha_bar(timesteps).float()[t][:, None].to(x0.device)
    t = t.to(x0.device)
    return (net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t) - eps).square().mean()


def build(arch: dict) -> nn.Module:
    """The network an `arch` dict describes: {'model': 'diffusion'|'ar', **constructor kwargs}."""
    kwargs = dict(arch)
    return ARCHS[kwargs.pop("model")](**kwargs)
