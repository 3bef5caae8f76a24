"""VAR sampling speed: the KV-cached sampler (`VAR.autoregressive_infer_cfg`) against a
straightforward loop that recomputes the whole prefix at every scale (no cache, the block-causal
mask instead), on the same small random weights and greedy decoding, measured in the same run.
Both must choose the same tokens.

    python benchmarks/var_sampler.py [--depth 4] [--batch 8] [--repeats 3] [--device cuda]
"""

import argparse

import torch
from timing import compare  # benchmarks/timing.py: this folder is first on sys.path

from VAR.models import build_vae_var
from VAR.sampler import _mask_top_k_top_p


@torch.no_grad()
def uncached(var, label_B, cfg):
    """Greedy CFG sampling with a full forward over the prefix at every scale. Returns the tokens."""
    B = len(label_B)
    quant = var.vae_quant_proxy[0]
    S = len(var.patch_nums)
    cond_BD = var.class_emb(torch.cat((label_B, torch.full_like(label_B, var.num_classes))))
    cond_gss = var.shared_ada_lin(cond_BD)
    lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
    tokens = [
        cond_BD.unsqueeze(1).expand(2 * B, var.first_l, -1)
        + var.pos_start.expand(2 * B, var.first_l, -1)
        + lvl_pos[:, : var.first_l]
    ]
    f_hat = cond_BD.new_zeros(B, var.Cvae, var.patch_nums[-1], var.patch_nums[-1])
    chosen, cur_L = [], 0
    for si, pn in enumerate(var.patch_nums):
        cur_L += pn * pn
        x = torch.cat(tokens, dim=1)
        for block in var.blocks:
            x = block(x=x, cond_BD=cond_gss, attn_bias=var.attn_bias_for_masking[:, :, :cur_L, :cur_L])
        logits = var.get_logits(x[:, cur_L - pn * pn :], cond_BD)
        t = cfg * si / (S - 1)
        guided = _mask_top_k_top_p((1 + t) * logits[:B] - t * logits[B:], 1, 0.0)
        idx = guided.argmax(dim=-1)
        chosen.append(idx)
        h = quant.embedding(idx).transpose(1, 2).reshape(B, var.Cvae, pn, pn)
        f_hat, next_map = quant.get_next_autoregressive_input(si, S, f_hat, h)
        if si != S - 1:
            nxt = var.patch_nums[si + 1]
            emb = var.word_embed(next_map.view(B, var.Cvae, -1).transpose(1, 2))
            tokens.append((emb + lvl_pos[:, cur_L : cur_L + nxt * nxt]).repeat(2, 1, 1))
    return torch.cat(chosen, dim=1)


@torch.no_grad()
def cached(var, label_B, cfg):
    steps = var.autoregressive_steps(len(label_B), label_B, cfg=cfg, top_k=1, top_p=0.0, g_seed=0)
    return torch.cat([step.idx_Bl for step in steps], dim=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.manual_seed(0)
    _, var = build_vae_var(
        args.device,
        V=512,
        Cvae=16,
        ch=32,
        patch_nums=(1, 2, 3, 4, 5, 6, 8, 10),
        num_classes=10,
        depth=args.depth,
    )
    var.eval()
    labels = (torch.arange(args.batch) % 10).to(args.device)
    same = torch.equal(cached(var, labels, 2.0), uncached(var, labels, 2.0))
    print(
        f"depth {args.depth}, {var.L} tokens per image, batch {args.batch}, device {args.device}: "
        f"same greedy tokens: {same}"
    )
    compare(
        {"uncached": lambda: uncached(var, labels, 2.0), "kv-cached": lambda: cached(var, labels, 2.0)},
        args.batch * var.L,
        args.repeats,
        args.device,
        unit="tokens",
    )


if __name__ == "__main__":
    main()
