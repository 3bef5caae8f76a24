"""FID (and optionally IS) of an xAR model with the flags of Neon's `xAR/calculate_fid.py`: a thin shim
over `neon.metrics.score`, the project's one scoring path.

    torchrun --standalone --nproc_per_node=8 -m xAR.calculate_fid --model xar_large \
        --model_ckpt checkpoints/Neon_xARL_imagenet256.pth --vae_path checkpoints/kl16.ckpt --cfg 2.7 \
        --flow_steps 50 --num_images 50000 --batch_size 32 --img_size 256 \
        --fid_stats fid_stats/adm_in256_stats.npz

`--model_ckpt` takes a flat state dict (`xAR-B.pth`, `xAR-L.pth`), `{'model_ema'}` (Neon snapshots, the
authors' Neon files), `{'state_dict'}`, a merge or one of our fine-tune snapshots; without `--model` the
arch is the file's own or read from the weights. Images are generated and scored in memory, sharded
over the processes: sample i has seed `--seed + i` and its own generator, labels are balanced over the
classes. Prints one JSON line.
"""


from neon.errors import ArgumentParser, run_command
from neon.metrics import score
from xAR.family import PRESETS, family


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        choices=sorted(PRESETS),
        default=None,
        help="architecture preset (default: the checkpoint's arch, else read from its weights)",
    )
    parser.add_argument("--model_ckpt", required=True)
    parser.add_argument("--vae_path", default=None, help="KL-16 VAE weights (default checkpoints/kl16.ckpt)")
    parser.add_argument(
        "--cfg", type=float, required=True, help="guidance at the last cell (xAR-B 2.7, xAR-L 2.3)"
    )
    parser.add_argument(
        "--flow_steps", type=int, default=40, help="Euler-Maruyama steps per cell (xAR-B 40, xAR-L 50)"
    )
    parser.add_argument("--num_images", type=int, default=50000)
    parser.add_argument("--batch_size", type=int, default=64, help="images per sampler call and process")
    parser.add_argument("--img_size", type=int, default=None, help="checked against the model")
    parser.add_argument(
        "--precision",
        choices=("fp16", "bf16", "fp32"),
        default="fp16",
        help="autocast on CUDA (the CPU runs float32)",
    )
    parser.add_argument(
        "--fid_stats", default="fid_stats/adm_in256_stats.npz", help="reference statistics .npz (path or URL)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image")
    parser.add_argument("--is", dest="inception_score", action="store_true", help="also the Inception score")
    score.add_metric_flags(parser)
    args = parser.parse_args(argv)
    run_command(lambda: _run(args))


def _run(args) -> None:
    sampler = family.Sampler(cfg=args.cfg, num_steps=args.flow_steps, precision=args.precision)
    metrics = score.score_checkpoint(
        family,
        args.model_ckpt,
        sampler,
        (args.seed, args.num_images),
        args.batch_size,
        args.fid_stats,
        arch=args.model,
        codec=args.vae_path,
        **score.metric_options(args),
        img_size=args.img_size,
        with_is=args.inception_score,
    )
    score.print_result(
        {
            "model_ckpt": args.model_ckpt,
            "cfg": args.cfg,
            "flow_steps": args.flow_steps,
            "num_images": args.num_images,
            "seeds": [args.seed, args.num_images],
            **metrics,
        }
    )


if __name__ == "__main__":
    main()
