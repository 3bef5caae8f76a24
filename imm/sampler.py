"""IMM's few-step pushforward sampler and per-sample initial latents.

Compatible with `pushforward_generator_fn` of `lumalabs/imm:generate_images.py` @ c9473e9 and of
`SinaAlemohammad/Neon:imm/calculate_fid.py` @ 76496c3 (code licensed CC BY-NC-SA 4.0); written anew.
The two upstream versions differ only in precision: lumalabs keeps the time grid and the state in
float64, Neon in the latents' dtype (float32). Here the latents' dtype decides, so float32 latents
give Neon's evaluation path and float64 latents lumalabs' (the network itself runs in float32 either
way). The 'edm' grid is computed in float64 and then cast to the latents' dtype.
"""

import torch


def time_steps(net, discretization="uniform", num_steps=8, mid_nt=None, dtype=torch.float32, device=None):
    """The times t_0 = T > t_1 > ... > t_N = eps, [N + 1] in `dtype`.

    'uniform': torch.linspace(T, eps, N + 1) in `dtype`. 'edm': η spaced with ρ = 7 between
    η(T) and η(eps), mapped back to t. None: [T, t(η) for η in mid_nt, eps] (N = len(mid_nt) + 1;
    each t(η) rounded to float32 as upstream).
    """
    if discretization == "uniform":
        return torch.linspace(net.T, net.eps, num_steps + 1, dtype=dtype, device=device)
    if discretization == "edm":
        rho = 7
        nt_min, nt_max = (
            net.get_log_nt(torch.tensor(v, dtype=torch.float64)).exp().item() for v in (net.eps, net.T)
        )
        frac = torch.arange(num_steps + 1, dtype=torch.float64, device=device) / num_steps
        nt = (nt_max ** (1 / rho) + frac * (nt_min ** (1 / rho) - nt_max ** (1 / rho))) ** rho
        return net.nt_to_t(nt).to(dtype)
    if discretization is None:
        # Both upstream versions convert each η through a float32 tensor.
        mid = [net.nt_to_t(torch.tensor(float(nt), dtype=torch.float32)).item() for nt in (mid_nt or [])]
        return torch.tensor([net.T, *mid, net.eps], dtype=dtype, device=device)
    raise ValueError(f"unknown discretization {discretization!r}")


def pushforward_generator_fn(
    net,
    latents,
    class_labels=None,
    discretization="uniform",
    num_steps=8,
    cfg_scale=None,
    mid_nt=None,
    return_states=False,
):
    """Sample by chaining the network's map: x_{i+1} = net.cfg_forward(x_i, t_i, t_{i+1}).

    Args:
        net: an IMMPrecond (any module with `T`, `eps`, `nt_to_t`, `get_log_nt` and `cfg_forward`).
        latents: x_0 = σ_d·N(0, I), [B, C, R, R]; its dtype is the dtype of the grid and the state.
        class_labels: one-hot [B, label_dim] (all-zero rows = unconditional), or None.
        discretization, num_steps, mid_nt: the time grid, see `time_steps`.
        cfg_scale: classifier-free guidance scale, or None for one conditional pass per step.
        return_states: also return the states [N + 1, B, C, R, R] (states[0] = latents).

    Returns:
        The final latents [B, C, R, R] in the latents' dtype (and the states if asked). Makes no
        random draws; call it under `torch.inference_mode()` (or no_grad).
    """
    t_steps = time_steps(net, discretization, num_steps, mid_nt, dtype=latents.dtype, device=latents.device)
    x = latents
    states = [x]
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        x = net.cfg_forward(x, t_cur, t_next, class_labels=class_labels, cfg_scale=cfg_scale).to(
            latents.dtype
        )
        if return_states:
            states.append(x)
    return (x, torch.stack(states)) if return_states else x


def generators(seeds, device="cpu"):
    """One torch.Generator per sample, seeded with seed % 2**63 (IMM upstream has no per-sample seeds;
    these make a sample depend on its own seed only)."""
    return [torch.Generator(device).manual_seed(int(seed) % (1 << 63)) for seed in seeds]


def initial_latents(gens, shape, sigma_data=0.5, device=None, dtype=torch.float32):
    """σ_d·N(0, I) latents [len(gens), *shape]: row b is `torch.randn(shape)` (float32) from gens[b]
    alone, so it does not depend on the batch it is drawn in. Returned on `device` in `dtype`."""
    rows = [torch.randn(tuple(shape), generator=g, device=g.device) for g in gens]
    return (torch.stack(rows) * sigma_data).to(device=device, dtype=dtype)
