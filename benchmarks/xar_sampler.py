"""xAR sampling speed: the KV-cached sampler (`xAR.sampler.sample_tokens`) against a straightforward loop
that recomputes the whole prefix of clean cells at every step (no cache, the block-causal mask instead),
on the same small random weights and the same per-sample draws, measured in the same run. Both must
produce the same tokens (to float32 accuracy: the two do the same arithmetic in different shapes).

    python benchmarks/xar_sampler.py [--width 128] [--depth 2] [--batch 4] [--steps 6] [--repeats 3] \
        [--device cuda]
"""

import argparse

import torch
from timing import compare  # benchmarks/timing.py: this folder is first on sys.path

from xAR.models import xAR
from xAR.models.xar import CELL, CELLS, CHANNELS, NULL_CLASS, to_latent
from xAR.sampler import em_step, per_sample_randn, sample_tokens, step_time_index, time_grid


@torch.inference_mode()
def uncached(model, labels, num_steps, cfg, randn):
    """`sample_tokens` with every network call over [clean cells 0..s-1 at t = 0; noisy cell s]."""
    B = len(labels)
    labels2 = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
    grid = time_grid(num_steps).tolist()
    cells = []
    for s in range(CELLS):
        scale = 1 + (cfg - 1) * s / (CELLS - 1)
        x = randn((B, CELL, CHANNELS), torch.float32).double()
        for i in range(num_steps):
            eps = randn((B, CELL, CHANNELS), torch.float64) if i < num_steps - 1 else None
            index = step_time_index(grid[i], 2 * B, i == 0, x.device)
            inp = torch.cat([*cells, x.float()], dim=1)
            index = torch.cat([torch.zeros(2 * B * s, dtype=torch.long, device=x.device), index])
            v = model.prefix_velocity(torch.cat([inp, inp]), labels2, index)[:, -CELL:]
            _, x = em_step(v, x, grid[i], grid[i + 1], scale, eps)
        cells.append(x.float())
    return to_latent(torch.cat(cells, dim=1))


def cached(model, labels, num_steps, cfg, randn):
    return sample_tokens(model, labels, num_steps, cfg, randn=randn)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=2, help="blocks in the encoder and in the decoder")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = (
        xAR(
            encoder_embed_dim=args.width,
            encoder_depth=args.depth,
            encoder_num_heads=args.width // 64,
            decoder_embed_dim=args.width,
            decoder_depth=args.depth,
            decoder_num_heads=args.width // 64,
        )
        .eval()
        .to(args.device)
    )
    labels = (torch.arange(args.batch) % 1000).to(args.device)

    def draws():  # CPU generators, the draws moved to the device, as the xAR family samples
        return per_sample_randn([torch.Generator().manual_seed(i) for i in range(args.batch)])

    a = cached(model, labels, args.steps, 3.0, draws())
    b = uncached(model, labels, args.steps, 3.0, draws())
    err = (a - b).abs().max().item()
    assert err < 1e-3 * a.abs().max().item() and a.std() > 0.1, (err, a.std())
    print(
        f"width {args.width}, {args.depth}+{args.depth} blocks, batch {args.batch}, "
        f"{args.steps} steps per cell: same tokens (max |difference| {err:.1e})"
    )
    compare(
        {
            name: (lambda run=run: run(model, labels, args.steps, 3.0, draws()))
            for name, run in (("uncached", uncached), ("kv-cached", cached))
        },
        args.batch,
        args.repeats,
        args.device,
    )


if __name__ == "__main__":
    main()
