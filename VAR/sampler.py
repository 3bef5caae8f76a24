"""VAR's sampler: next-scale prediction with classifier-free guidance and a key/value cache.

Compatible with the samplers of `FoundationVision/VAR:models/var.py` (`autoregressive_infer_cfg`) and
`models/helpers.py` (top-k/top-p masking, Gumbel-softmax) @ 78b95394 (MIT License, Copyright (c) 2024
FoundationVision); written here. `VAR.autoregressive_infer_cfg` and `VAR.autoregressive_steps`, the
upstream-named methods, are thin entries into `sample_images` and `autoregressive_steps`.

Randomness: a generator made per call from `g_seed` (upstream's draws for the same seed), torch's default
generator, or one generator per sample (`generators=`): sample i then draws only from generators[i], so
its tokens do not depend on the rest of the batch.
"""

from typing import NamedTuple

import torch


class ARStep(NamedTuple):
    """What one scale of sampling decided.

    si: scale index. logits_BlV: float32 [B, pn², V] guided logits, before top-k/top-p. idx_Bl: int64
    [B, pn²] sampled tokens. f_hat: float32 [B, Cvae, pn_S, pn_S] cumulative latent after this scale.
    """

    si: int
    logits_BlV: torch.Tensor
    idx_Bl: torch.Tensor
    f_hat: torch.Tensor


def _mask_top_k_top_p(logits_BlV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf the logits outside the top k (ties at the k-th value survive), then those outside the
    smallest set whose softmax mass exceeds top_p (the most likely token always survives). 0 disables."""
    if top_k > 0:
        kth = logits_BlV.topk(min(top_k, logits_BlV.shape[-1]), dim=-1, largest=True, sorted=False)[0]
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth.amin(dim=-1, keepdim=True), -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        logits_BlV = logits_BlV.masked_fill(drop_sorted.scatter(-1, sorted_idx, drop_sorted), -torch.inf)
    return logits_BlV


def _draw_tokens(logits_BlV: torch.Tensor, rng) -> torch.Tensor:
    """int64 [B, l]: one categorical draw per position. rng: a generator (or None: torch's default) shared
    by the batch, drawn in one `multinomial` call as upstream; or a list of B generators, one per sample."""
    B, n, V = logits_BlV.shape
    probs_BlV = logits_BlV.softmax(dim=-1)
    if isinstance(rng, list):
        return torch.stack(
            [
                torch.multinomial(p_lV, 1, replacement=True, generator=g)[:, 0]
                for p_lV, g in zip(probs_BlV, rng)
            ]
        )
    return torch.multinomial(probs_BlV.view(-1, V), 1, replacement=True, generator=rng).view(B, n)


def _gumbel_softmax(logits_BlV: torch.Tensor, tau: float, rng) -> torch.Tensor:
    """softmax((logits + Gumbel noise) / tau) over V; rng as in `_draw_tokens`."""
    if isinstance(rng, list):
        noise = torch.stack(
            [torch.empty_like(row).exponential_(generator=g) for row, g in zip(logits_BlV, rng)]
        )
    else:
        noise = torch.empty_like(logits_BlV).exponential_(generator=rng)
    return ((logits_BlV - noise.log()) / tau).softmax(dim=-1)


def _sampling_rng(var, B, g_seed, generators):
    if generators is not None:
        if g_seed is not None or len(generators) != B:
            raise ValueError("pass either g_seed or exactly B generators")
        return list(generators)
    if g_seed is None:
        return None
    return torch.Generator(device=var.lvl_1L.device).manual_seed(g_seed)


def _labels(var, B, label_B, rng) -> torch.Tensor:
    device = var.lvl_1L.device
    if label_B is None:  # uniform over the real classes
        uniform = torch.full((1, var.num_classes), 1.0 / var.num_classes, device=device)
        if isinstance(rng, list):
            return torch.cat([torch.multinomial(uniform, 1, replacement=True, generator=g)[0] for g in rng])
        return torch.multinomial(uniform, num_samples=B, replacement=True, generator=rng).reshape(B)
    if isinstance(label_B, int):
        label_B = torch.full((B,), label_B, device=device)
    return torch.where(label_B < 0, var.num_classes, label_B)


@torch.no_grad()
def autoregressive_steps(
    var, B: int, label_B, g_seed=None, cfg=1.5, top_k=0, top_p=0.0, more_smooth=False, generators=None
):
    """Sample scale by scale with `var`, yielding an `ARStep` per scale; arguments as `sample_images`.

    Each step runs the new scale's tokens through the blocks with the key/value cache on, for the label
    and the null class at once (batch 2B), guides the logits with t = cfg·si/(S-1):
    (1 + t)·cond - t·uncond, masks them with top_k / top_p, draws one token per position, and adds the
    embedded tokens, bicubically upsampled and refined by φ, to f_hat. The next scale's input is f_hat
    area-resized to its side. With `more_smooth`, the tokens' embeddings are replaced by a Gumbel-softmax
    mixture of the codebook (upstream's visualisation mode; the token draw still happens).
    """
    rng = _sampling_rng(var, B, g_seed, generators)
    label_B = _labels(var, B, label_B, rng)
    quant = var.vae_quant_proxy[0]
    S = len(var.patch_nums)
    sos = cond_BD = var.class_emb(torch.cat((label_B, torch.full_like(label_B, var.num_classes))))
    cond_BD_or_gss = var.shared_ada_lin(cond_BD)
    lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
    next_token_map = (
        sos.unsqueeze(1).expand(2 * B, var.first_l, -1)
        + var.pos_start.expand(2 * B, var.first_l, -1)
        + lvl_pos[:, : var.first_l]
    )
    f_hat = sos.new_zeros(B, var.Cvae, var.patch_nums[-1], var.patch_nums[-1])
    for block in var.blocks:
        block.attn.kv_caching(True)
    try:
        cur_L = 0
        for si, pn in enumerate(var.patch_nums):
            ratio = si / var.num_stages_minus_1
            cur_L += pn * pn
            x_BlC = next_token_map
            for block in var.blocks:
                x_BlC = block(x=x_BlC, cond_BD=cond_BD_or_gss, attn_bias=None)
            logits_2BlV = var.get_logits(x_BlC, cond_BD)
            t = cfg * ratio
            logits_BlV = (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]
            masked_BlV = _mask_top_k_top_p(logits_BlV, top_k, top_p)
            idx_Bl = _draw_tokens(masked_BlV, rng)
            if more_smooth:
                tau = max(0.27 * (1 - ratio * 0.95), 0.005)
                h_BlC = _gumbel_softmax(
                    masked_BlV.mul(1 + ratio), tau, rng
                ) @ quant.embedding.weight.unsqueeze(0)
            else:
                h_BlC = quant.embedding(idx_Bl)
            h_BChw = h_BlC.transpose(1, 2).reshape(B, var.Cvae, pn, pn)
            f_hat, next_map = quant.get_next_autoregressive_input(si, S, f_hat, h_BChw)
            yield ARStep(si, logits_BlV, idx_Bl, f_hat)
            if si != S - 1:
                pn_next = var.patch_nums[si + 1]
                next_token_map = var.word_embed(next_map.view(B, var.Cvae, -1).transpose(1, 2))
                next_token_map = (next_token_map + lvl_pos[:, cur_L : cur_L + pn_next * pn_next]).repeat(
                    2, 1, 1
                )
    finally:
        for block in var.blocks:
            block.attn.kv_caching(False)


@torch.no_grad()
def sample_images(
    var, B: int, label_B, g_seed=None, cfg=1.5, top_k=0, top_p=0.0, more_smooth=False, generators=None
) -> torch.Tensor:
    """Sample B images with classifier-free guidance.

    Args:
        B: batch size.
        label_B: int64 [B], an int for the whole batch, or None to draw labels uniformly; negative or
            num_classes = the null class (unconditional).
        g_seed: seed of the one generator all draws of the batch come from (None: torch's default
            generator). Reproduces upstream's draws for the same seed.
        cfg: guidance scale, ramped linearly over scales from 0 at the first to cfg at the last.
        top_k, top_p: truncation of each position's distribution (0 disables).
        more_smooth: Gumbel-softmax embeddings instead of hard tokens (visualisation only, not for FID).
        generators: instead of g_seed, B generators on the model's device; sample i then draws only from
            generators[i], so it does not depend on the rest of the batch.
    Returns:
        float32 [B, 3, H, W] in [0, 1], H = W = 16·patch_nums[-1].
    """
    for step in autoregressive_steps(
        var,
        B,
        label_B,
        g_seed=g_seed,
        cfg=cfg,
        top_k=top_k,
        top_p=top_p,
        more_smooth=more_smooth,
        generators=generators,
    ):
        f_hat = step.f_hat
    return var.vae_proxy[0].fhat_to_img(f_hat).add_(1).mul_(0.5)
