"""FID of an IMM model with the paper's flags: a thin shim over `neon.metrics.score`, the project's
one scoring path.

    torchrun --standalone --nproc_per_node=8 -m imm.calculate_fid \
        --model_ckpt checkpoints/Neon_imm_imagenet256.pkl \
        --vae checkpoints/sd-vae-ft-ema --num_images 50000 --batch_size 64 --img_size 256 \
        --fid_stats fid_stats/adm_in256_stats.npz --steps 8 --cfg 1.8

`--model_ckpt` takes an IMM network pickle (the official `imagenet256_ts_a2.pkl`, the authors'
`Neon_imm_imagenet256.pkl`; read without running their code), our `.pt`/`.pth` files (merges, fine-tune
snapshots) or a `.safetensors` file with `--arch im256`. `--vae` is the diffusers folder of the SD-VAE
ft-EMA. Images are generated and scored in memory, sharded over the processes: sample i has seed
`--seed + i` and its own generator, labels are balanced over the classes. The defaults are the
paper's headline setting (T = 8 uniform steps, guidance 1.8). Prints one JSON line.
"""


from imm.family import DEFAULT_CODEC, PRESETS, family
from neon.errors import ArgumentParser, NeonError, run_command
from neon.metrics import score


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_ckpt", required=True, help="IMM checkpoint (.pkl, .pt/.pth, .safetensors)")
    parser.add_argument(
        "--vae", default=DEFAULT_CODEC, help=f"SD-VAE diffusers folder (default {DEFAULT_CODEC})"
    )
    parser.add_argument("--num_images", type=int, default=50000)
    parser.add_argument("--batch_size", type=int, default=64, help="images per sampler call and process")
    parser.add_argument("--img_size", type=int, default=None, help="checked against the model")
    parser.add_argument("--fid_stats", required=True, help="reference statistics .npz (path or URL)")
    parser.add_argument("--steps", type=int, default=8, help="pushforward steps T (uniform grid)")
    parser.add_argument("--cfg", type=float, default=1.8, help="guidance scale (1: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image")
    parser.add_argument("--arch", choices=sorted(PRESETS), help="architecture of a .safetensors file")
    score.add_metric_flags(parser)
    args = parser.parse_args(argv)
    run_command(lambda: _run(args))


def _run(args) -> None:
    if args.num_images < 2:
        raise NeonError(f"--num_images must be at least 2, got {args.num_images}")
    sampler = family.Sampler(num_steps=args.steps, cfg=args.cfg)
    value = score.score_checkpoint(
        family,
        args.model_ckpt,
        sampler,
        (args.seed, args.num_images),
        args.batch_size,
        args.fid_stats,
        arch=args.arch,
        codec=args.vae,
        **score.metric_options(args),
        img_size=args.img_size,
    )
    score.print_result(
        {
            "model_ckpt": args.model_ckpt,
            "steps": args.steps,
            "cfg": args.cfg,
            "num_images": args.num_images,
            "seeds": [args.seed, args.num_images],
            **value,
        }
    )


if __name__ == "__main__":
    main()
