"""The Inductive Moment Matching training loss (Zhou et al. 2025): per group of M images sharing the
times s ≤ r < t, the squared MMD (Laplace kernel, V-statistic) between the student pushforward
f_{s,t}(x_t) and the stop-gradient target f_{s,r}(x_r), weighted per group.

Compatible with `SinaAlemohammad/Neon:imm/training/loss.py` and the training helpers at the end of
`imm/training/preconds.py` @ 76496c3 (lumalabs/imm released no training code); written anew with the
same arguments, formulas and order of random draws, so a call after `torch.manual_seed(s)`
reproduces the authors' numbers for the same s on CPU. Only sample_t_mode='uniform' (the
ImageNet-256 setting) and sample_repeat=1 are ported; augmentation is not.

Times ('uniform'; η = σ/α, for fm η = t/(1 - t)):
    t = u_t·(t(η_high) - t(η_low)) + t(η_low),  s = u_s·(t(η_t) - t(η_low)) + t(η_low), η_s ≤ η_t,
    η_r = clamp(η_t - (η_high - η_low)·2^-k, η_low, η_high),
    r = min(r, max(t - min_tr_gap, η_low)),  r = max(max(r, s), eps).
Noising: x_t = α_t·x + σ_t·n, x_r = α_r·x + σ_r·n with the same n = σ_d·z.
Kernel: K(a, b) = exp(-w·‖a - b‖₂/(D·sigma)), ‖·‖² clamped at 1e-8, D = C·H·W, w from
`net.get_kernel_weight` (1/(σ_d·|t - s|) for euler_fm).
Loss per group: w_out·(mean K(st, st) + mean K(sr, sr) - 2·mean K(st, sr)), NaN -> 0.
"""

import math

import torch

DRAWS = ("u_t", "u_s", "u_drop", "z")


def _kernel(a, b, w, sigma):
    """Laplace kernel matrices [G, M, M] between a [G, M, ...] and b [G, M, ...] (row = a's index)."""
    sq = (a[:, :, None] - b[:, None, :]).square().flatten(3).sum(-1)
    dim = math.prod(a.shape[2:])
    return torch.exp(-w[:, None, None] * sq.clamp_min(1e-8).sqrt() / dim / sigma)


class IMMLoss:
    """IMM loss. __call__(net, images [B, C, H, W] float32 (normalised latents), labels one-hot
    [B, label_dim] or None, generator=None, draws=None) -> per-group losses [G] (G = B / matrix_size,
    float64 for float64 times), not reduced: training back-propagates its mean.

    `net` is an IMMPrecond or a wrapper with `.module` (DDP); the student call goes through `net`
    (with gradients and the net's autocast), the target through it under no_grad with force_fp32, with
    the device RNG state of the student call restored so dropout masks match.

    Random draws, in this order: (1) u_t = rand([G, 1, 1, 1], float64), (2) u_s likewise, (3) u_drop =
    rand([B]) float32 (only when labels are given; the label is dropped where u_drop < label_dropout),
    (4) z = randn_like(images). All come from `generator` when given (then moved to the images'
    device); else (1), (2), (4) from the images' device's default generator and (3) from the CPU one,
    as upstream. `draws` (a dict with any of 'u_t' [G], 'u_s' [G], 'u_drop' [B], 'z' [B, C, H, W])
    replaces those draws.

    Label dropout is applied to the student branch only, as the authors do; drop_labels_in_target=True
    uses the dropped labels for the target as well.
    """

    def __init__(
        self,
        sigma=1,
        sample_t_mode="uniform",
        matrix_size=4,
        sample_repeat=1,
        a=2,
        b=4,
        k=12,
        label_dropout=0.1,
        min_tr_gap=1e-4,
        drop_labels_in_target=False,
    ):
        if sample_t_mode != "uniform":
            raise NotImplementedError(f"sample_t_mode {sample_t_mode!r}: only 'uniform' is ported")
        if sample_repeat != 1:
            raise NotImplementedError("sample_repeat != 1 is not ported")
        self.sigma = sigma
        self.sample_t_mode = sample_t_mode
        self.matrix_size = matrix_size
        self.sample_repeat = sample_repeat
        self.a = a
        self.b = b
        self.k = k
        self.label_dropout = label_dropout
        self.min_tr_gap = min_tr_gap
        self.drop_labels_in_target = drop_labels_in_target

    def _draws(self, images, labels, generator, draws):
        draws = dict(draws or {})
        groups = images.shape[0] // self.matrix_size
        device = images.device if generator is None else generator.device
        out = {}
        for name in DRAWS:
            if name == "u_drop" and labels is None:
                continue
            if name in draws:
                out[name] = torch.as_tensor(draws[name], device=images.device)
            elif name in ("u_t", "u_s"):
                out[name] = torch.rand(
                    [groups, 1, 1, 1], dtype=torch.float64, device=device, generator=generator
                )
            elif name == "u_drop":
                out[name] = torch.rand(
                    [images.shape[0]], device="cpu" if generator is None else device, generator=generator
                )
            else:
                out[name] = torch.randn(images.shape, dtype=images.dtype, device=device, generator=generator)
            out[name] = out[name].to(images.device)
        out["u_t"], out["u_s"] = out["u_t"].reshape(groups), out["u_s"].reshape(groups)
        return out

    def times(self, net, u_t, u_s):
        """(t, r, s), float64 [G] each, from the uniforms u_t, u_s [G] (see the module docstring)."""
        lo, hi = (torch.tensor(v, dtype=torch.float64, device=u_t.device) for v in (net.nt_low, net.nt_high))
        t_lo = net.nt_to_t(lo)
        nt = net.get_log_nt(u_t * (net.nt_to_t(hi) - t_lo) + t_lo).exp()
        ns = net.get_log_nt(u_s * (net.nt_to_t(nt) - t_lo) + t_lo).exp()
        ns = torch.minimum(ns, nt).clamp(min=net.nt_low)
        nr = (nt - (net.nt_high - net.nt_low) * 0.5**self.k).clamp(min=net.nt_low, max=net.nt_high)
        t, r, s = net.nt_to_t(nt), net.nt_to_t(nr), net.nt_to_t(ns)
        if self.min_tr_gap is not None:
            r = torch.minimum(r, (t - self.min_tr_gap).clamp(min=net.nt_low))
        r = torch.maximum(r, s).clamp(min=net.eps)
        return t, r, s

    def terms(self, net, images, labels=None, generator=None, draws=None):
        """Everything the loss is made of, as a dict: the draws, t/r/s [G], labels_drop, drop_mask,
        noise, yt, yr, f_st, f_sr, w, wout, K_st_st, K_sr_sr, K_st_sr [G, M, M], inter_sample_sim,
        inter_gt_sim, cross_sim and loss [G]."""
        precond = getattr(net, "module", net)
        m = self.matrix_size
        assert images.shape[0] % m == 0, f"batch {images.shape[0]} is not a multiple of matrix_size {m}"
        out = self._draws(images, labels, generator, draws)
        t, r, s = self.times(precond, out["u_t"], out["u_s"])
        out.update(t=t, r=r, s=s)

        labels_drop = labels
        if labels is not None:
            out["drop_mask"] = out["u_drop"] < self.label_dropout
            labels_drop = torch.where(out["drop_mask"][:, None], torch.zeros_like(labels), labels)
        out["labels_drop"] = labels_drop

        per_sample = [v.repeat_interleave(m).reshape(-1, 1, 1, 1) for v in (t, r, s)]
        t_b, r_b, s_b = per_sample
        out["noise"] = out["z"] * precond.sigma_data
        out["yt"], _ = precond.add_noise(images, t_b, out["noise"])
        out["yr"] = precond.ddim(out["yt"], images, t_b, r_b, noise=out["noise"])

        cuda = images.device.type == "cuda"
        rng_state = torch.cuda.get_rng_state(images.device) if cuda else torch.get_rng_state()
        f_st = net(out["yt"], t_b, s_b, labels_drop)
        if cuda:
            torch.cuda.set_rng_state(rng_state, images.device)
        else:
            torch.set_rng_state(rng_state)
        with torch.no_grad():
            target_labels = labels_drop if self.drop_labels_in_target else labels
            f_sr = net(out["yr"], r_b, s_b, target_labels, force_fp32=True)
        out.update(f_st=f_st, f_sr=f_sr)

        w, wout = precond.get_kernel_weight(t, s, a=self.a, b=self.b)
        st, sr = (f.reshape(-1, m, *f.shape[1:]) for f in (f_st, f_sr))
        out.update(
            w=w,
            wout=wout,
            K_st_st=_kernel(st, st, w, self.sigma),
            K_sr_sr=_kernel(sr, sr, w, self.sigma),
            K_st_sr=_kernel(st, sr, w, self.sigma),
        )
        out["inter_sample_sim"] = out["K_st_st"].mean((1, 2))
        out["inter_gt_sim"] = out["K_sr_sr"].mean((1, 2))
        out["cross_sim"] = out["K_st_sr"].mean((1, 2))
        loss = wout * (out["inter_sample_sim"] + out["inter_gt_sim"] - 2 * out["cross_sim"])
        out["loss"] = torch.nan_to_num(loss) if torch.isnan(loss).any() else loss
        return out

    def __call__(self, net, images, labels=None, generator=None, draws=None):
        return self.terms(net, images, labels, generator=generator, draws=draws)["loss"]
