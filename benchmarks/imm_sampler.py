"""IMM sampling speed: our path (`imm.sampler.initial_latents` from per-sample generators, then
`imm.sampler.pushforward_generator_fn` under inference mode, float32 grid and state, one doubled
network call per guided step, on our DiT) against a straightforward loop written the way lumalabs'
generate_images.py runs it (no_grad, float64 grid and state, c_in, time labels, guidance and the Euler
map written out) around the DiT computed the way upstream's dit.py and timm compute it
(`upstream_dit`), with the same small random weights and seeds, measured in the same run. Both start
from the same latents (asserted bitwise) and must end at the same latents (float32 rounding).

Where the time goes: the backbone is over 99% of either loop (the grid, c_in, labels, guidance and
the map, float64 or not, are under 1%), so the gain is the network's. Upstream's tokens are a
transposed view that every LayerNorm and Linear copies; its adaLN modulate and gated residuals are a
multiply and an add each (here one fused `addcmul`); its GELU writes a new tensor (here, with no
autograd recording, it overwrites fc1's output, the largest tensor of a block; fewer fresh buffers
also means fewer page faults on CPU). The "backbone only" line times the T doubled calls of our
network alone on fixed inputs: the floor our loop runs at. One intra-op thread by default: a parallel
kernel on a shared CPU waits for its slowest thread. Even so, on a loaded machine a loop's rate varies
by about ±10% from round to round, hence the medians.

    python benchmarks/imm_sampler.py [--batch 64] [--steps 8] [--cfg 1.5] [--repeats 9] [--threads 1] \
        [--device cpu]
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from timing import compare  # benchmarks/timing.py: this folder is first on sys.path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import imm  # noqa: E402


def small_net(device):
    """A small conditional DiT (16x16x4 latents, 64 tokens) with random (non-zero) weights."""
    torch.manual_seed(0)  # the construction draws too: the same weights in every run
    net = imm.IMMPrecond(
        img_resolution=16,
        img_channels=4,
        label_dim=10,
        model_type="DiT",
        patch_size=2,
        hidden_size=128,
        depth=4,
        num_heads=4,
        num_classes=10,
        s_embed=True,
        noise_schedule="fm",
        f_type="euler_fm",
        temb_type="stride",
        time_scale=1000,
        sigma_data=0.5,
        eps=0.0,
        T=0.994,
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))  # DiT's adaLN-Zero init would make every output 0
    return net.eval().requires_grad_(False).to(device)


def upstream_dit(dit, x, tau_t, tau_s, labels):
    """`dit`'s forward with its own weights, computed the way upstream's dit.py on timm's layers
    computes it: timm's PatchEmbed leaves the tokens a [N, L, D] view of [N, D, L] memory, and every
    residual sum keeps that layout, so each LayerNorm and Linear first copies it; adaLN's modulate is
    h·(1 + scale) + shift and each gated residual x + gate·branch, two passes and a temporary each
    where the network here makes one fused multiply-add; the GELU writes a new tensor."""

    def modulate(h, shift, scale):
        return h * (1 + scale[:, None]) + shift[:, None]

    tokens = dit.x_embedder.proj(x).flatten(2).transpose(1, 2) + dit.pos_embed
    c = (
        dit.t_embedder(tau_t)
        + dit.s_embedder(tau_s)
        + dit.y_embedder(dit.class_index(labels, len(x), x.device), False)
    )
    for block in dit.blocks:
        shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c).chunk(6, dim=1)
        tokens = tokens + gate1[:, None] * block.attn(modulate(block.norm1(tokens), shift1, scale1))
        hidden = F.gelu(block.mlp.fc1(modulate(block.norm2(tokens), shift2, scale2)), approximate="tanh")
        tokens = tokens + gate2[:, None] * block.mlp.fc2(hidden)
    final = dit.final_layer
    shift, scale = final.adaLN_modulation(c).chunk(2, dim=1)
    return dit.unpatchify(final.linear(modulate(final.norm_final(tokens), shift, scale)))


def straightforward(net, seeds, labels, steps, cfg):
    """Guided pushforward sampling as generate_images.py does it, for comparison only.
    Returns (initial latents, final latents float64)."""
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    device = labels.device
    with torch.no_grad():
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        z = (z * net.sigma_data).to(device)
        onehot = torch.eye(net.label_dim, device=device)[labels]
        both = torch.cat([torch.zeros_like(onehot), onehot])
        grid = torch.linspace(net.T, net.eps, steps + 1, dtype=torch.float64, device=device)
        x = z.to(torch.float64)
        for i in range(steps):
            t, s = grid[i], grid[i + 1]
            c_in = 1 / (net.sigma_data * ((1 - t) ** 2 + t**2).sqrt())
            x_in = (c_in * torch.cat([x, x])).to(torch.float32)
            tau_t = (1000 * t).to(torch.float32).expand(x_in.shape[0])
            tau_s = (1000 * (t - s)).to(torch.float32).expand(x_in.shape[0])
            F_u, F_c = upstream_dit(net.model, x_in, tau_t, tau_s, both).to(torch.float64).chunk(2)
            x = x - (t - s) * net.sigma_data * (F_u + cfg * (F_c - F_u))
    return z, x


def ours(net, seeds, labels, steps, cfg):
    """Our sampler. Returns (initial latents, final latents float32)."""
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    device = labels.device
    with torch.inference_mode():
        z = imm.initial_latents(imm.generators(seeds), shape, sigma_data=net.sigma_data, device=device)
        onehot = torch.eye(net.label_dim, device=device)[labels]
        return z, imm.pushforward_generator_fn(
            net, z, onehot, discretization="uniform", num_steps=steps, cfg_scale=cfg
        )


def backbone_only(net, batch, steps):
    """The work both loops share: `steps` backbone calls on a doubled batch (fixed inputs)."""
    device = next(net.parameters()).device
    x = torch.randn(2 * batch, net.img_channels, net.img_resolution, net.img_resolution, device=device)
    labels = torch.eye(net.label_dim, device=x.device)[
        torch.arange(2 * batch, device=x.device) % net.label_dim
    ]
    tau = torch.full([1], 500.0, device=x.device)

    def run():
        with torch.inference_mode():
            for _ in range(steps):
                net.model(x, tau, tau, class_labels=labels)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (CPU)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net = small_net(args.device)
    seeds = torch.arange(args.batch)
    labels = (torch.arange(args.batch) % 10).to(args.device)
    z_ours, x_ours = ours(net, seeds, labels, args.steps, args.cfg)
    z_ref, x_ref = straightforward(net, seeds, labels, args.steps, args.cfg)
    assert torch.equal(z_ours, z_ref), "the two paths must start from the same latents"
    gap = (x_ours.double() - x_ref).abs().max().item()
    assert gap < 1e-4, gap
    print(f"identical initial latents; max |ours - straightforward| at the end = {gap:.2e}")
    # compare() prints the ratio of the last entry to the first: ours / straightforward.
    compare(
        {
            "straightforward": lambda: straightforward(net, seeds, labels, args.steps, args.cfg),
            "backbone only": backbone_only(net, args.batch, args.steps),
            "ours": lambda: ours(net, seeds, labels, args.steps, args.cfg),
        },
        args.batch,
        args.repeats,
        args.device,
    )


if __name__ == "__main__":
    main()
