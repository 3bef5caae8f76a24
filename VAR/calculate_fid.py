"""FID of a VAR model with the paper's flags: a thin shim over `neon.metrics.score`, the
project's one scoring path.

    torchrun --standalone --nproc_per_node=8 -m VAR.calculate_fid \
        --var_ckpt checkpoints/Neon_VARd16_imagenet256.pth \
        --vae_ckpt checkpoints/vae_ch160v4096z32.pth --num_images 50000 --cfg 2.8 --top_k 900 --top_p 0.95 \
        --img_size 256 --fid_stats fid_stats/adm_in256_stats.npz --seed 0

`--var_ckpt` takes a flat, `{'var_wo_ddp'}` or `{'trainer'}` checkpoint, a merge or a fine-tune snapshot;
the depth and resolution are read from the weights. Images are generated and scored in memory, sharded
over the processes: sample i has seed `--seed + i` and its own generator, labels are balanced over the
1000 classes. Prints one JSON line.
"""


from neon.errors import ArgumentParser, run_command
from neon.metrics import score
from VAR.family import family


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--var_ckpt", required=True)
    parser.add_argument(
        "--vae_ckpt", default=None, help="VQ-VAE weights (default checkpoints/vae_ch160v4096z32.pth)"
    )
    parser.add_argument("--num_images", "--N", dest="num_images", type=int, default=50000)
    parser.add_argument("--batch_size", type=int, default=64, help="images per sampler call and process")
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--top_k", type=int, default=900)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument(
        "--img_size", type=int, choices=(256, 512), default=None, help="checked against the model"
    )
    parser.add_argument("--fid_stats", required=True, help="reference statistics .npz (path or URL)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image")
    score.add_metric_flags(parser)
    args = parser.parse_args(argv)
    run_command(lambda: _run(args))


def _run(args) -> None:
    sampler = family.Sampler(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    value = score.score_checkpoint(
        family,
        args.var_ckpt,
        sampler,
        (args.seed, args.num_images),
        args.batch_size,
        args.fid_stats,
        codec=args.vae_ckpt,
        **score.metric_options(args),
        img_size=args.img_size,
    )
    score.print_result(
        {
            "var_ckpt": args.var_ckpt,
            "cfg": args.cfg,
            "num_images": args.num_images,
            "seeds": [args.seed, args.num_images],
            **value,
        }
    )


if __name__ == "__main__":
    main()
