"""The EDM sampler (Karras et al. 2022, Algorithm 2): Heun's 2nd-order method on the probability-flow
ODE over the ρ-schedule of noise levels, with optional stochastic "churn", plus the per-seed random
generator EDM uses to make every sample independent of its batch.

Mirrors `edm_sampler` and `StackedRandomGenerator` of `NVlabs/edm:generate.py` @ 008a4e5 (code
licensed CC BY-NC-SA 4.0 by NVIDIA); written anew with the same signature, update rule and order of
random draws. Neon's own sampler copies (`SinaAlemohammad/Neon:edm/calculate_fid.py`, ...) use the
same update rule.
"""

import math

import torch


def edm_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
    S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
):
    """Draw images from a preconditioned denoiser (EDM Algorithm 2).

    Args:
        net: a denoiser D(x, sigma, class_labels) -> float32 [B, C, H, W] with `sigma_min`,
            `sigma_max` and `round_sigma` (EDMPrecond, VPPrecond, VEPrecond). It is called with
            float64 x and a 0-dim float64 sigma, without augment labels.
        latents: [B, C, H, W] standard normal noise; scaled by the first noise level.
        class_labels: [B, label_dim] one-hot rows, or None.
        randn_like: source of the churn noise, called exactly once per step with the float64 state
            x_i [B, C, H, W] (even when churn is off and the draw is multiplied by 0), so a per-sample
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
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)

    # Noise levels in float64 (EDM Eq. 5), with t_N = 0 appended.
    step = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    t_steps = (hi + step / (num_steps - 1) * (lo - hi)) ** rho
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn: raise the noise level from t_cur to t_hat by adding fresh noise.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step from t_hat to t_next; dx/dt = (x - D(x; t)) / t (EDM Eq. 4 with σ(t) = t).
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Heun correction, skipped on the last step where t_next = 0.
        if i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


class StackedRandomGenerator:
    """One `torch.Generator` per sample, seeded with `seed % 2**32`; draws of shape [B, ...] are the
    stack of each generator's draw of shape [...], so row b depends only on seeds[b].

    EDM's generate.py draws, per generator and in this order: the latent `randn([B, C, H, W])`
    (float32), then for conditional nets the class `randint(label_dim, size=[B])`, then one
    `randn_like` per sampler step (float64).
    """

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=g, **kwargs) for g in self.generators])

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=g, **kwargs) for g in self.generators])
