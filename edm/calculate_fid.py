"""FID of an EDM network with the paper's flags: a thin shim over `neon.metrics.score`, the
project's one scoring path.

    torchrun --standalone --nproc_per_node=8 -m edm.calculate_fid \
        --network_pkl checkpoints/edm-cifar10-32x32-cond-vp.pkl \
        --ref https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz --seeds 0-49999 --num_steps 18

`--network_pkl` takes an EDM network pickle (read without running its code), our `.pt` files (merges,
fine-tune snapshots) or a `.safetensors` file with `--arch`. `--ref` is a path or a URL, downloaded once
into `fid_stats/`. Images are generated and scored in memory, sharded over the processes; class labels
are balanced over the classes and shuffled by the first seed. Prints one JSON line.
"""


from edm.family import PRESETS, family
from neon.errors import ArgumentParser, NeonError, run_command
from neon.metrics import score


def parse_seeds(text: str) -> tuple[int, int]:
    """'0-49999' → (0, 50000): the first seed and the number of seeds (a contiguous range)."""
    try:
        first, last = (int(v) for v in text.split("-")) if "-" in text else (int(text), int(text))
    except ValueError:
        raise NeonError(f"--seeds takes a range like 0-49999, got {text!r}") from None
    if last < first:
        raise NeonError(f"--seeds {text}: the range is empty")
    return first, last - first + 1


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network_pkl", "--network", dest="network", required=True, help="network file")
    parser.add_argument("--ref", required=True, help="reference statistics .npz (path or URL)")
    parser.add_argument("--seeds", default="0-49999", help="seed range, e.g. 0-49999")
    parser.add_argument("--max_batch_size", type=int, default=64, help="images per sampler call and process")
    parser.add_argument("--num_steps", type=int, default=18, help="Heun steps")
    parser.add_argument("--arch", choices=sorted(PRESETS), help="architecture of a .safetensors file")
    score.add_metric_flags(parser)
    args = parser.parse_args(argv)
    run_command(lambda: _run(args))


def _run(args) -> None:
    seeds = parse_seeds(args.seeds)
    value = score.score_checkpoint(
        family,
        args.network,
        family.Sampler(num_steps=args.num_steps),
        seeds,
        args.max_batch_size,
        args.ref,
        arch=args.arch,
        **score.metric_options(args),
    )
    score.print_result(
        {
            "network": args.network,
            "ref": args.ref,
            "seeds": list(seeds),
            "num_steps": args.num_steps,
            **value,
        }
    )


if __name__ == "__main__":
    main()
