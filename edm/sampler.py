"""The EDM sampler (Karras et al. 2022, Algorithm 2): Heun's 2nd-order method on the probability-flow
ODE over the ρ-schedule of noise levels, with optional stochastic "churn", plus the per-seed random
generator EDM uses to make every sample independent of its batch.

Compatible with `edm_sampler` and `StackedRandomGenerator` of `NVlabs/edm:generate.py` @ 008a4e5:
same signature, update rule and order of random draws (see UPSTREAM.md). The code is written here.
"""

import math

import torch


def _noise_levels(num_steps, sigma_min, sigma_max, rho, device):
    """t_i = (σ_max^(1/ρ) + i/(N-1)·(σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ for i < N (EDM Eq. 5): float64 [N]."""
    first, last = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    frac = torch.arange(num_steps, dtype=torch.float64, device=device) / (num_steps - 1)
    return (first + frac * (last - first)) ** rho


def _schedule(net, num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise, device):
    """The whole run, decided before the first network call: a list of N tuples
    (t_cur, t_next, t_hat, churn_std): 0-dim float64 tensors t_cur, t_next and t_hat = t_cur·(1 + γ)
    (the raised noise level), and the Python float churn_std = S_noise·√(t_hat² - t_cur²), exactly 0
    when γ = 0."""
    t = net.round_sigma(_noise_levels(num_steps, sigma_min, sigma_max, rho, device))
    t = torch.cat([t, t.new_zeros([1])])  # t_N = 0
    gamma_on = min(S_churn / num_steps, math.sqrt(2) - 1)
    gamma = [gamma_on if S_min <= level <= S_max else 0 for level in t[:-1].tolist()]
    t_cur, t_next = t[:-1], t[1:]
    t_hat = net.round_sigma(t_cur + torch.as_tensor(gamma, dtype=t.dtype, device=device) * t_cur)
    churn_std = (t_hat**2 - t_cur**2).sqrt() * S_noise
    return list(zip(t_cur.unbind(), t_next.unbind(), t_hat.unbind(), churn_std.tolist()))


def _slope(net, x, t, class_labels):
    """dx/dt = (x - D(x; t)) / t, the probability-flow ODE with σ(t) = t (EDM Eq. 4)."""
    return (x - net(x, t, class_labels).to(torch.float64)) / t


def _heun_step(net, x, t, t_next, class_labels, second_order):
    """Integrate from noise level t to t_next: an Euler step, then (if `second_order`) the trapezoidal
    correction with the slope at the Euler point. x float64 [B, C, H, W] -> same."""
    h = t_next - t
    slope = _slope(net, x, t, class_labels)
    x_euler = x + h * slope
    if not second_order:
        return x_euler
    return x + h * (0.5 * (slope + _slope(net, x_euler, t_next, class_labels)))


def edm_sampler(
    net,
    latents,
    class_labels=None,
    randn_like=torch.randn_like,
    num_steps=18,
    sigma_min=0.002,
    sigma_max=80,
    rho=7,
    S_churn=0,
    S_min=0,
    S_max=float("inf"),
    S_noise=1,
):
    """Draw images from a preconditioned denoiser (EDM Algorithm 2).

    Args:
        net: a denoiser D(x, sigma, class_labels) -> float32 [B, C, H, W] with `sigma_min`,
            `sigma_max` and `round_sigma` (EDMPrecond, VPPrecond, VEPrecond). It is called with
            float64 x and a 0-dim float64 sigma, without augment labels.
        latents: [B, C, H, W] standard normal noise; scaled by the first noise level.
        class_labels: [B, label_dim] one-hot rows, or None.
        randn_like: source of the churn noise, called exactly once per step with the float64 state
            x_i [B, C, H, W] (even when churn is off and the draw is not used), so a per-sample
            generator (`StackedRandomGenerator.randn_like`, or any closure keyed by sample seeds and
            the call count) makes sample b depend only on its own seed.
        num_steps: N, the number of noise levels; the network is evaluated 2N - 1 times.
        sigma_min, sigma_max, rho: the schedule t_i = (σ_max^(1/ρ) + i/(N-1)(σ_min^(1/ρ) -
            σ_max^(1/ρ)))^ρ for i < N and t_N = 0 (EDM Eq. 5), after clamping [σ_min, σ_max] to the
            net's supported range.
        S_churn, S_min, S_max, S_noise: churn γ_i = min(S_churn/N, √2 - 1) for t_i in [S_min, S_max],
            else 0; noise of standard deviation S_noise·√(t̂² - t_i²) is added before each step.

    Returns:
        float64 [B, C, H, W], nominally in [-1, 1]. No gradients are needed: callers run it under
        `torch.inference_mode()`.
    """
    schedule = _schedule(
        net,
        num_steps,
        max(sigma_min, net.sigma_min),
        min(sigma_max, net.sigma_max),
        rho,
        S_churn,
        S_min,
        S_max,
        S_noise,
        latents.device,
    )
    x = latents.to(torch.float64) * schedule[0][0]
    for i, (_, t_next, t_hat, churn_std) in enumerate(schedule):
        noise = randn_like(x)  # drawn every step: per-seed streams must not depend on the settings
        if churn_std > 0:
            x = x + churn_std * noise
        # The last step ends at t_N = 0, where the slope is undefined: Euler only.
        x = _heun_step(net, x, t_hat, t_next, class_labels, second_order=i < num_steps - 1)
    return x


def _seeded_generator(device, seed):
    """A `torch.Generator` on device seeded as generate.py seeds it: with seed mod 2**32."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) % 2**32)
    return generator


class StackedRandomGenerator:
    """Random numbers per sample: one `torch.Generator` on `device` per seed (seeded with
    `seed % 2**32`). A draw of shape [B, ...] stacks every generator's own draw of shape [...], so row b
    depends only on seeds[b] and on how many draws came before, never on the batch it sits in. Draws
    are made on the generators' device and moved to the `device` asked for, so CPU generators
    (`device='cpu'`, as the EDM family makes them) give a seed the same numbers on any device.

    EDM's generate.py draws, per generator and in this order: the latent `randn([B, C, H, W])`
    (float32), then for conditional nets the class `randint(label_dim, size=[B])`, then one
    `randn_like` per sampler step (float64).
    """

    def __init__(self, device, seeds):
        self.generators = [_seeded_generator(device, seed) for seed in seeds]

    def _per_row(self, draw, size, *args, **kwargs):
        size = list(size)
        if not size or size[0] != len(self.generators):
            raise ValueError(f"size {size} must start with the number of seeds, {len(self.generators)}")
        device = kwargs.pop("device", None)
        rows = [draw(*args, size=size[1:], generator=g, device=g.device, **kwargs) for g in self.generators]
        return torch.stack(rows).to(device)

    def randn(self, size, **kwargs):
        """Standard normal [B, ...]; kwargs as for `torch.randn` (dtype, device, layout)."""
        return self._per_row(torch.randn, size, **kwargs)

    def randn_like(self, input):
        """Standard normal with input's shape [B, ...], dtype, layout and device."""
        return self._per_row(
            torch.randn, input.shape, dtype=input.dtype, layout=input.layout, device=input.device
        )

    def randint(self, *args, size, **kwargs):
        """Integers as `torch.randint(*args, size=...)` with size [B, ...]."""
        return self._per_row(torch.randint, size, *args, **kwargs)
