"""EDM sampling speed: our path (`edm.family.sample`: inference mode, per-seed generators,
`edm.sampler.edm_sampler`) against a straightforward loop written the way upstream's generate.py
runs it (no_grad, float64 state, Heun with churn bookkeeping per step), on the same tiny network and
seeds, measured in the same run.

    python benchmarks/edm_sampler.py [--batch 64] [--steps 18] [--repeats 3] [--device cuda]
"""

import argparse

import torch
from timing import compare  # benchmarks/timing.py: this folder is first on sys.path

from edm.family import family


def upstream_style(net, seeds, labels, steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Heun sampling as generate.py does it, for comparison only."""
    device = next(net.parameters()).device
    gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    with torch.no_grad():
        latents = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])
        for g in gens:
            torch.randint(net.label_dim, size=[1], generator=g, device=device)
        class_labels = torch.eye(net.label_dim, device=device)[labels.to(device)]
        i = torch.arange(steps, dtype=torch.float64)
        t = (
            sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
        ) ** rho
        t = torch.cat([torch.as_tensor(net.round_sigma(t)), torch.zeros_like(t[:1])]).to(device)
        x = latents.to(torch.float64) * t[0]
        for k in range(steps):
            noise = torch.stack(
                [torch.randn(shape, generator=g, dtype=torch.float64, device=device) for g in gens]
            )
            x_hat = x + 0 * noise  # S_churn = 0: gamma = 0, the draw is kept for the stream
            d = (x_hat - net(x_hat, t[k], class_labels).to(torch.float64)) / t[k]
            x = x_hat + (t[k + 1] - t[k]) * d
            if k < steps - 1:
                d2 = (x - net(x, t[k + 1], class_labels).to(torch.float64)) / t[k + 1]
                x = x_hat + (t[k + 1] - t[k]) * (0.5 * d + 0.5 * d2)
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    model = family.tiny(0)
    model.net.to(args.device)
    seeds, labels = torch.arange(args.batch), torch.arange(args.batch) % 10
    sampler = family.Sampler(num_steps=args.steps)
    ours = family.sample(model, labels, seeds, sampler)
    theirs = upstream_style(model.net, seeds, labels, args.steps)
    print(f"max |ours - upstream-style| = {(ours.int() - theirs.int()).abs().max().item()} (uint8 levels)")
    print(f"device {args.device}, batch {args.batch}, {args.steps} steps")
    compare(
        {
            "upstream-style": lambda: upstream_style(model.net, seeds, labels, args.steps),
            "ours": lambda: family.sample(model, labels, seeds, sampler),
        },
        args.batch,
        args.repeats,
        args.device,
    )


if __name__ == "__main__":
    main()
