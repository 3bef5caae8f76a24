"""FID of a diffusers pipeline with the flags its users expect: a thin shim over
`neon.metrics.score`, the project's one scoring path.

    torchrun --standalone --nproc_per_node=8 -m diffusers_family.calculate_fid --ckpt facebook/DiT-XL-2-256 \
        --num_images 50000 --num_steps 50 --cfg 1.5 --fid_stats fid_stats/adm_in256_stats.npz

`--ckpt` takes a pipeline folder (a base, a fine-tune snapshot, a merge) or a hub id, fetched once.
`--fid_stats` is a path or a URL. Images are generated from seeds [seed, seed + num_images) and scored
in memory, sharded over the processes; class labels are balanced over the classes. Prints one JSON line.
"""


from diffusers_family.family import family
from neon.errors import ArgumentParser, run_command
from neon.metrics import score


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="pipeline folder or hub id")
    parser.add_argument("--num_images", type=int, default=50000, help="images to score")
    parser.add_argument("--num_steps", type=int, default=50, help="scheduler steps")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (DiT); none when left out")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM's eta")
    parser.add_argument("--fid_stats", required=True, help="reference statistics .npz (path or URL)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--batch_size", type=int, default=64, help="images per sampler call and process")
    score.add_metric_flags(parser)
    args = parser.parse_args(argv)
    run_command(lambda: _run(args))


def _run(args) -> None:
    sampler = family.Sampler(num_steps=args.num_steps, cfg=args.cfg, eta=args.eta)
    value = score.score_checkpoint(
        family,
        args.ckpt,
        sampler,
        (args.seed, args.num_images),
        args.batch_size,
        args.fid_stats,
        **score.metric_options(args),
    )
    score.print_result(
        {
            "ckpt": args.ckpt,
            "fid_stats": args.fid_stats,
            "num_images": args.num_images,
            "num_steps": args.num_steps,
            "cfg": args.cfg,
            "eta": args.eta,
            **value,
        }
    )


if __name__ == "__main__":
    main()
