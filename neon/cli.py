"""The `neon` command: sample | finetune | merge | sweep | report | fid-stats | fid | diagnose | demo | plan.

One table, `VERBS`, is the command line: each verb's flags are `Flag` records, from which argparse's
options are built and which say the key each flag sets (`--num-images` → `synthetic.num`). `main`
parses, resolves the verb's mapping (YAML from --config, then the flags at their keys, then dotted
`--section.field VALUE` overrides) and hands it to the verb's body in `neon.verbs`, which builds its
config, calls one library function and prints a one-line summary (with --dry-run: the mapping as
YAML). User errors (NeonError) print `error: <message>` and exit with code 2; writes are atomic, so
nothing partial is left behind.

  torchrun --nproc_per_node=8 -m neon.cli sample --config configs/toy/diffusion_zeta1.1.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys

from neon import config, plan, verbs
from neon.errors import ArgumentParser, NeonError, run_command
from neon.metrics import score
from neon.recipe import SECTIONS

# A flag's key is a recipe field (`synthetic.num`, `family`) or, outside the recipe's sections, an
# argument of the verb (`merge.w`, `images`); the verb reads both from its mapping, --dry-run prints it.


@dataclasses.dataclass(frozen=True)
class Flag:
    """One argument of a verb: `name` (`--num-images`; no dashes: a positional) sets `key`."""

    name: str
    key: str
    help: str
    type: type = str
    """bool: a switch (present → True)."""
    aliases: tuple[str, ...] = ()
    nargs: str | None = None
    choices: tuple[str, ...] | None = None
    default: object = None
    """None: not given, so the --config value stands."""
    metavar: str | None = None


@dataclasses.dataclass(frozen=True)
class Verb:
    help: str
    flags: tuple[Flag, ...]
    reads: tuple[str, ...] | None = None
    """The keys it reads from --config (None: the whole recipe)."""
    overrides: tuple[str, ...] = SECTIONS
    """The recipe sections its dotted `--section.field` overrides may set."""


FAMILY = Flag("--family", "family", "family name or package.module:attribute")
DETERMINISTIC = Flag("--deterministic", "deterministic", "bitwise reruns on GPU: deterministic algorithms, "
                     "no cuDNN autotuning (slower; recipe key `deterministic`)", bool)
IMAGES = Flag("--images", "images",
              "a folder of PNG/JPEG, an .npz of uint8 [N,H,W,3] images or a synthetic set")
INCEPTION = Flag("--inception-weights", "fid.inception_weights",
                 "InceptionV3 weights file (default: checkpoints/ or download)")


def metric_flags(of: str, keys: tuple[str, str, str], default) -> tuple[Flag, Flag, Flag]:
    """--is, --precision-recall/--pr and --metrics, scoring `of`."""
    return (Flag("--is", keys[0], f"also the Inception score (10 splits) {of}", bool, default=default),
            Flag("--precision-recall", keys[1], f"also precision/recall (k=5) {of} against these real images",
                 aliases=("--pr",), metavar="REAL_SRC"),
            Flag("--metrics", keys[2], f"fid,fd_dinov2,prdc: metrics {of} (fd_dinov2 and prdc against --pr's "
                 f"real images)", _metric_list))


def _metric_list(text: str) -> list[str]:
    return score.parse_metrics(text)


VERBS = {
    "sample": Verb("draw the synthetic set S from the base model (resumable)", (
        FAMILY,
        Flag("--ckpt", "model.ckpt", "base checkpoint"),
        Flag("--out", "synthetic.out", "output directory"),
        Flag("--num-images", "synthetic.num", "number of samples", int, aliases=("--num",)),
        Flag("--batch-size", "synthetic.batch_size", "samples per call and process", int),
        Flag("--seed", "synthetic.seed_base", "seed of sample 0", int),
        Flag("--shard-size", "synthetic.shard_size", "samples per shard file", int),
        DETERMINISTIC)),
    "finetune": Verb("fine-tune a copy of the base on S (resumable)", (
        FAMILY,
        Flag("--ckpt", "model.ckpt", "base checkpoint"),
        Flag("--data", "finetune.data", "synthetic set directory"),
        Flag("--out", "finetune.out", "run directory"),
        Flag("--images", "finetune.total_images", "total images", int),
        Flag("--batch-size", "finetune.batch_size", "global batch size", int),
        Flag("--lr", "finetune.lr", "learning rate", float),
        Flag("--ramp-images", "finetune.ramp_images", "linear lr ramp length in images", int),
        Flag("--ema-beta", "finetune.ema_beta", "per-step EMA decay", float),
        Flag("--snapshot-every", "finetune.snapshot_every_images", "snapshot interval in images", int),
        Flag("--precision", "finetune.precision", "fp32 | bf16 | fp16"),
        DETERMINISTIC)),
    "merge": Verb("write θ_neon = (1 + w) base − w self_trained", (
        Flag("--family", "family", "family name or package.module:attribute (default: found from the base)"),
        Flag("--base", "model.ckpt", "base checkpoint"),
        Flag("--self-trained", "merge.self_trained", "self-trained snapshot", aliases=("--self",)),
        Flag("--w", "merge.w", "extrapolation weight", float),
        Flag("--out", "merge.out", "output file"),
        Flag("--format", "merge.format", "the base's container (default) or plain safetensors",
             choices=("same", "safetensors"), default="same"),
        Flag("--allow-nonfinite", "merge.allow_nonfinite", "write the merge even when the self-trained "
             "weights or the result hold NaN/inf", bool, default=False)),
        reads=("family", "model.ckpt"), overrides=()),
    "sweep": Verb("choose w (and cfg) by FID over snapshots", (
        FAMILY,
        Flag("--base", "model.ckpt", "base checkpoint"),
        Flag("--self-trained", "sweep.self_trained", "snapshots: glob pattern or run directory",
             aliases=("--self",)),
        Flag("--w", "sweep.w", "grid start:stop:step or a,b,c"),
        Flag("--cfg", "sweep.cfg", "guidance scales", float, nargs="+"),
        Flag("--num-images", "sweep.num", "samples per evaluation", int, aliases=("--num",)),
        Flag("--final-num", "sweep.final_num", "samples of the final report", int),
        Flag("--out", "sweep.out", "directory of results.jsonl"),
        Flag("--ref", "sweep.ref", "reference statistics .npz"),
        Flag("--batch-size", "sweep.batch_size", "samples per call and process", int),
        Flag("--inception-weights", "fid.inception_weights", "InceptionV3 weights for image families"),
        *metric_flags("of the final report's two points",
                      ("sweep.inception_score", "sweep.precision_recall", "sweep.metrics"), default=None),
        DETERMINISTIC)),
    "fid-stats": Verb("write reference statistics (mu, sigma of Inception features) of images", (
        IMAGES,
        Flag("--out", "out", "output .npz"),
        INCEPTION,
        Flag("--batch-size", "fid.batch_size", "images per Inception forward and process", int)),
        reads=("fid",), overrides=("fid",)),
    "fid": Verb("FID of images against reference statistics (and IS, precision/recall); one JSON line", (
        IMAGES,
        Flag("--ref", "ref", "reference statistics .npz (mu, sigma)"),
        INCEPTION,
        Flag("--batch-size", "fid.batch_size", "images per Inception forward and process", int),
        *metric_flags("of the images", ("is", "pr", "metrics"), default=False)),
        reads=("fid",), overrides=("fid",)),
    "diagnose": Verb("will Neon help, and with which sign of w? cos_P of real vs synthetic gradients", (
        FAMILY,
        Flag("--ckpt", "model.ckpt", "base checkpoint"),
        Flag("--real", "diagnose.real", "real data: toy:N, a synthetic set, or an image folder/.npz "
             "(class-conditional models need labels: an .npz with a `labels` array)"),
        Flag("--synthetic", "diagnose.synthetic", "synthetic set directory"),
        Flag("--batches", "diagnose.batches", "batches per side (bootstrap units)", int, default=16),
        Flag("--repeats", "diagnose.repeats", "loss draws per batch (16 for the toy diffusion model)", int,
             default=1),
        Flag("--preconditioner", "diagnose.preconditioner", "batches Adam's second moment is estimated on",
             choices=("pooled", "real", "synthetic"), default="pooled"),
        Flag("--seed", "diagnose.seed", "seed of the batches and the bootstrap", int, default=0))),
    "demo": Verb("Neon on the toy models, or on another installed demo (entry point group `neon.demos`): "
                 "a table, plots and results.json", (
        Flag("demo", "demo", "which demo (default: toy)", nargs="?", metavar="NAME"),
        Flag("--quick", "quick", "smaller run (under a minute on 2 cores)", bool, default=False),
        Flag("--out", "out", "output directory (default outputs/demo, or outputs/NAME)")),
        reads=(), overrides=()),
    "report": Verb("a finished sweep's final table (mean ± sd over seed ranges), compute and pictures", (
        Flag("sweep_dir", "sweep_dir", "the sweep's output folder (results.jsonl, config.resolved.yaml)"),),
        reads=(), overrides=()),
    "plan": Verb("what a recipe costs before it runs: per-GPU memory, disk, images, GPU-hours (CPU only)", (
        Flag("recipe", "recipe", "YAML recipe (or --config)", nargs="?", metavar="RECIPE"),
        Flag("--gpus", "gpus", "GPUs the fine-tune's global batch is split over", int,
             default=plan.H100["gpus"]),
        Flag("--gpu-memory", "gpu_memory", "memory of one GPU in GiB (H100: 80)", float,
             default=plan.H100["gpu_memory"], metavar="GB"),
        Flag("--gpu-tflops", "gpu_tflops", "16-bit dense peak TFLOP/s of one GPU (H100 SXM: 989)", float,
             default=plan.H100["gpu_tflops"], metavar="T"),
        Flag("--utilization", "utilization", "fraction of the peak reached", float,
             default=plan.H100["utilization"], metavar="U"),
        Flag("--json", "json", "one JSON object on stdout instead of the table", bool, default=False))),
}
EPILOG = ("Any recipe field can be set with --section.field VALUE, "
          "e.g. --sampler.zeta 1.1 or --finetune.lr 1e-5.")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args, extra = parser.parse_known_args(_glued(_demo_flag(argv)))
    overrides = _dotted(extra, parser)
    run = getattr(verbs, "cmd_" + args.verb.replace("-", "_"))  # looked up now: tests replace verbs
    run_command(lambda: run(_resolve(args, overrides), args.dry_run))


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="neon", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="verb", required=True)
    for name, verb in VERBS.items():
        sub = subparsers.add_parser(name, help=verb.help, description=verb.help)
        sub.add_argument("--config", help="YAML recipe")
        sub.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
        for flag in verb.flags:
            _add(sub, flag)
    return parser


def _add(parser: argparse.ArgumentParser, flag: Flag) -> None:
    """The argparse option of `flag`; its value lands at args.<key> (typed, or None when not given)."""
    if not flag.name.startswith("-"):  # a positional: argparse takes its dest from the name
        assert flag.name == flag.key, flag
        parser.add_argument(flag.name, help=flag.help, nargs=flag.nargs, default=flag.default,
                            metavar=flag.metavar)
        return
    text = f"{flag.help} ({flag.key})" if "." in flag.key and _in_recipe(flag.key) else flag.help
    if flag.type is bool:
        parser.add_argument(flag.name, *flag.aliases, dest=flag.key, action="store_true",
                            default=flag.default, help=text)
        return
    metavar = flag.metavar or (None if flag.choices else flag.name.lstrip("-").replace("-", "_").upper())
    parser.add_argument(flag.name, *flag.aliases, dest=flag.key, type=flag.type, nargs=flag.nargs,
                        choices=flag.choices, default=flag.default, metavar=metavar, help=text)


def _demo_flag(argv: list[str]) -> list[str]:
    """`neon demo --NAME` (the spelling before `neon demo NAME`) for an installed demo NAME → `neon demo
    NAME`; other arguments are left as they are."""
    if not argv or argv[0] != "demo":
        return argv
    names = {f"--{name}": name for name in verbs.demo_names()}
    return [names.get(token, token) for token in argv]


_NEGATIVE = re.compile(r"^-\.?\d")  # -2:2:0.25, -1,-0.5, -1e-5, -3
_PLAIN_NEGATIVE = re.compile(r"^-\d+$|^-\d*\.\d+$")  # what argparse itself reads as a value
_DOTTED = re.compile(r"^--[^=]*\.[^=]*$")  # --section.field, without its value


def _glued(argv: list[str]) -> list[str]:
    """Each value glued to its flag where argparse would misread it. argparse reads a token that starts
    with '-' as an option unless it is a plain number, so a negative grid, list or exponent after a flag
    the table says takes a value is glued to it (['--w', '-2:2:0.25'] → ['--w=-2:2:0.25']); and a dotted
    override's value always is, so that no positional argument (`neon demo NAME`) takes it."""
    verb = VERBS.get(argv[0]) if argv else None
    takes_value = {name for flag in (verb.flags if verb else ()) if flag.type is not bool
                   for name in (flag.name, *flag.aliases)}
    out = []
    for token in argv:
        previous = out[-1] if out else ""
        negative = _NEGATIVE.match(token) is not None
        if (previous in takes_value and negative and not _PLAIN_NEGATIVE.match(token)
                or _DOTTED.match(previous) and (negative or not token.startswith("-"))):
            out[-1] = f"{previous}={token}"
        else:
            out.append(token)
    return out


def _dotted(extra: list[str], parser) -> list[tuple[str, str]]:
    """['--a.b', 'v', '--c.d=v'] → [('a.b', 'v'), ('c.d', 'v')]; anything else is a usage error."""
    pairs, i = [], 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--") or "." not in token.split("=")[0]:
            parser.error(f"unrecognized argument: {token}")
        if "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        elif i + 1 < len(extra):
            key, value = token[2:], extra[i + 1]
            i += 2
        else:
            parser.error(f"{token} needs a value")
        if key.split(".")[0] not in SECTIONS:
            parser.error(f"unknown recipe section in {token}")
        pairs.append((key, value))
    return pairs


def _resolve(args, overrides: list[tuple[str, str]]) -> dict:
    """The verb's mapping: what it reads of the --config recipe, then each flag given at its key (a
    verb argument, outside the recipe's sections, is always there: None when not given), then the
    dotted overrides."""
    verb = VERBS[args.verb]
    recipe = config.load_yaml(args.config) if args.config else {}
    raw = recipe if verb.reads is None else _pick(recipe, verb.reads)
    for flag in verb.flags:
        value = getattr(args, flag.key)
        if value is not None or not _in_recipe(flag.key):
            config.set_dotted(raw, flag.key, value, parse=False)  # argparse has typed it
    for key, value in overrides:
        if key.split(".")[0] not in verb.overrides:
            allowed = ", ".join(f"--{section}.*" for section in verb.overrides)
            raise NeonError(f"neon {args.verb} takes " + (f"only {allowed} recipe overrides" if allowed else
                                                           "no recipe overrides") + f" (got --{key})")
        config.set_dotted(raw, key, value)
    return raw


def _in_recipe(key: str) -> bool:
    return key.split(".")[0] in SECTIONS


def _pick(recipe: dict, keys: tuple[str, ...]) -> dict:
    """The `keys` (dotted) of `recipe` that it holds."""
    picked = {}
    for key in keys:
        node = recipe
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            config.set_dotted(picked, key, dict(node) if isinstance(node, dict) else node, parse=False)
    return picked


if __name__ == "__main__":
    main()
