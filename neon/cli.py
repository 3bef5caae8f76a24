"""The `neon` command: sample | finetune | merge | sweep | report | fid-stats | fid | diagnose | demo.

Each verb parses its flags, builds the recipe (YAML from --config, then the verb's flags, then
dotted `--section.field VALUE` overrides), calls one library function, drains it under a rank-0
progress bar and prints a one-line summary. User errors (NeonError) print `error: <message>` and
exit with code 2; writes are atomic, so nothing partial is left behind.

  torchrun --nproc_per_node=8 -m neon.cli sample --config configs/toy/diffusion_zeta1.1.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import re
import json
import os
import sys

import torch

from neon import config, diagnose, distributed, family, finetune, log, merge, progress, report, search, sweep, synthetic
from neon.io import files
from neon.errors import ArgumentParser, NeonError, run_command
from neon.metrics import fid, inception, score

SECTIONS = ("family", "deterministic", "model", "sampler", "synthetic", "finetune", "sweep", "fid")

# flag -> recipe key, per verb (flag names as in the README so recipes and docs agree)
SAMPLE_FLAGS = {"family": "family", "ckpt": "model.ckpt", "out": "synthetic.out", "num_images": "synthetic.num",
                "batch_size": "synthetic.batch_size", "seed": "synthetic.seed_base",
                "shard_size": "synthetic.shard_size", "deterministic": "deterministic"}
FINETUNE_FLAGS = {"family": "family", "ckpt": "model.ckpt", "data": "finetune.data", "out": "finetune.out",
                  "images": "finetune.total_images", "batch_size": "finetune.batch_size", "lr": "finetune.lr",
                  "ramp_images": "finetune.ramp_images", "ema_beta": "finetune.ema_beta",
                  "snapshot_every": "finetune.snapshot_every_images", "precision": "finetune.precision",
                  "deterministic": "deterministic"}
SWEEP_FLAGS = {"family": "family", "base": "model.ckpt", "self_trained": "sweep.self_trained", "w": "sweep.w",
               "cfg": "sweep.cfg", "num_images": "sweep.num", "final_num": "sweep.final_num", "out": "sweep.out",
               "ref": "sweep.ref", "batch_size": "sweep.batch_size", "inception_weights": "fid.inception_weights",
               "inception_score": "sweep.inception_score", "pr": "sweep.precision_recall",
               "metrics": "sweep.metrics", "deterministic": "deterministic"}
# fid-stats and fid read only the recipe's `fid` section (they need no family)
FID_FLAGS = {"inception_weights": "fid.inception_weights", "batch_size": "fid.batch_size"}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A resolved recipe: the sections one verb needs (the others stay None)."""

    family: str
    model: family.ModelConfig
    deterministic: bool = False
    sampler: object = None
    synthetic: synthetic.SyntheticConfig | None = None
    finetune: finetune.FinetuneConfig | None = None
    sweep: sweep.SweepConfig | None = None
    fid: inception.FidConfig | None = None


def build_recipe(raw: dict, sections=SECTIONS) -> Recipe:
    """Validate `raw` (a recipe dict) and build the named sections. Unfilled links between sections
    are resolved here: finetune.data defaults to synthetic.out, sweep.self_trained to finetune.out."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise NeonError(f"unknown recipe section {unknown[0]!r} (known: {', '.join(SECTIONS)})")
    if not raw.get("family"):
        raise NeonError("family (--family) is required")
    fam = family.get(raw["family"])
    deterministic = raw.get("deterministic", False)
    if not isinstance(deterministic, bool):
        raise NeonError(f"deterministic: expected true or false, got {deterministic!r}")
    for name, value in raw.items():
        if name not in ("family", "deterministic") and value is not None and not isinstance(value, dict):
            raise NeonError(f"{name}: expected a mapping of fields, got {value!r}")
    raw = {k: dict(v or {}) if k not in ("family", "deterministic") else v for k, v in raw.items()}
    ft, sw = raw.setdefault("finetune", {}), raw.setdefault("sweep", {})
    if ft.get("data") is None and raw.get("synthetic", {}).get("out"):
        ft["data"] = raw["synthetic"]["out"]
    if sw.get("self_trained") is None and ft.get("out"):
        sw["self_trained"] = ft["out"]
    built = {"family": raw["family"], "deterministic": deterministic,
             "model": config.build(family.ModelConfig, raw.get("model"), "model")}
    types = {"sampler": fam.Sampler, "synthetic": synthetic.SyntheticConfig,
             "finetune": finetune.FinetuneConfig, "sweep": sweep.SweepConfig, "fid": inception.FidConfig}
    for name in sections:
        if name in types:
            built[name] = config.build(types[name], raw.get(name), name)
    if "sweep" in sections:  # the evaluation sampler: the recipe's with sweep.sampler's fields changed
        config.build(fam.Sampler, {**(raw.get("sampler") or {}), **built["sweep"].sampler}, "sweep.sampler")
    return Recipe(**built)


def main(argv=None) -> None:
    parser = _parser()
    args, extra = parser.parse_known_args(_joined_negatives(sys.argv[1:] if argv is None else list(argv)))
    run_command(lambda: args.run(args, _dotted(extra, parser)))


_NEGATIVE = re.compile(r"^-(\d|\.\d)")
_PLAIN_NEGATIVE = re.compile(r"^-\d+$|^-\d*\.\d+$")  # what argparse itself reads as a value


def _joined_negatives(argv: list[str]) -> list[str]:
    """['--w', '-2:2:0.25'] → ['--w=-2:2:0.25']: argparse reads a value that starts with '-' as an
    option unless it is a plain number, so negative grids, lists and exponents are glued to their flag."""
    out = []
    for token in argv:
        if (out and _NEGATIVE.match(token) and not _PLAIN_NEGATIVE.match(token) and out[-1].startswith("--")
                and "=" not in out[-1]):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def cmd_sample(args, overrides):
    recipe = _recipe(args, overrides, SAMPLE_FLAGS, ("sampler", "synthetic"))
    conf = recipe.synthetic
    if _dry_run(args, recipe) or not _need(model=recipe.model.ckpt, out=conf.out):
        return
    files.check_output(conf.out, "dir")
    fam, model = _load(recipe)
    base = family.local_path(fam, recipe.model.ckpt)  # a hub id: the folder it was fetched into
    base_sha = distributed.broadcast_object(files.sha256(base) if distributed.is_main() else None)
    with _claimed(conf.out, "neon sample", keep=lambda name: name.startswith("shard-")):
        progress.drain(synthetic.write(fam, model, recipe.sampler, conf, base_sha), "sample")
        _save_resolved(conf.out, recipe)
    _say(f"synthetic set of {conf.num} samples in {conf.out}")


def cmd_finetune(args, overrides):
    recipe = _recipe(args, overrides, FINETUNE_FLAGS, ("finetune",))
    conf = recipe.finetune
    if _dry_run(args, recipe) or not _need(model=recipe.model.ckpt, data=conf.data, out=conf.out):
        return
    files.check_output(conf.out, "dir")
    fam, model = _load(recipe)
    finetune.open_data(conf, fam.name)  # checked before anything is written
    with _claimed(conf.out, "neon finetune", keep=lambda name: name != "stats.jsonl"):
        _save_resolved(conf.out, recipe)
        log.setup(conf.out)
        result = progress.drain(finetune.run(fam, model, conf), "finetune")
    _say(f"fine-tuned to {conf.total_images} images; snapshots in {conf.out}"
         + (f" (last loss {result['loss']:.4f})" if result["loss"] is not None else " (already complete)"))


def cmd_merge(args, overrides):
    if overrides:
        raise NeonError(f"neon merge takes no recipe overrides (got --{overrides[0][0]})")
    base, name = args.base, args.family
    if args.config:
        raw = config.load_yaml(args.config)
        base = base if base is not None else (raw.get("model") or {}).get("ckpt")
        name = name if name is not None else raw.get("family")
    if args.dry_run:
        print(json.dumps({"family": name, "base": base, "self_trained": args.self_trained, "w": args.w,
                          "out": args.out, "format": args.format}))
        return
    _need(base=base, self=args.self_trained, w=args.w, out=args.out)
    if distributed.world() > 1:
        raise NeonError("neon merge runs in one process; launch it without torchrun")
    files.check_output(args.out, "file")
    fam = family.get(name) if name else None  # else found from the base (neon.family.detect)
    merge.merge_files(base, args.self_trained, args.w, args.out, args.format, family=fam,
                      allow_nonfinite=args.allow_nonfinite)
    _say(f"wrote {args.out} = (1 + {args.w}) base − {args.w} self_trained")


def cmd_sweep(args, overrides):
    recipe = _recipe(args, overrides, SWEEP_FLAGS, ("sampler", "sweep", "fid"))
    conf = recipe.sweep
    if args.dry_run:
        _dry_run(args, recipe)
        try:  # the fine-tune section, where the recipe has one, tells how many snapshots there will be
            ft = _recipe(args, overrides, SWEEP_FLAGS, ("finetune",)).finetune
        except NeonError:
            ft = None
        print(_selection_line(recipe.sweep, ft))
        return
    _need(base=recipe.model.ckpt, self=conf.self_trained)
    sweep.snapshot_paths(conf)  # before the default output folder is derived from them
    out = sweep.output_dir(conf)
    files.check_output(out, "dir")
    fam, model = _load(recipe)
    with _claimed(out, "neon sweep"):
        _save_resolved(out, recipe)
        result = progress.drain(sweep.run(fam, model, recipe.model.ckpt, recipe.sampler, conf, recipe.fid), "sweep",
                                on_info=lambda record: _say(_json(record), err=True))
        _say(_json(result.to_dict()))
        if distributed.is_main():  # the pictures of `neon report`: fid_vs_w.png, fid_w_cfg.png, samples.png
            report.run(out, model)


def _selection_line(conf: sweep.SweepConfig, ft: finetune.FinetuneConfig | None) -> str:
    """A YAML comment: the images the selection generates at most against the full grid's, and the cfg
    values it can reach (the snapshots the recipe's fine-tune writes, else those on disk)."""
    if ft is not None and ft.out and conf.self_trained == ft.out:
        every = ft.snapshot_every_images or ft.total_images
        count = len({min(ft.total_images, -(-k * every // ft.batch_size) * ft.batch_size)
                     for k in range(1, -(-ft.total_images // every) + 1)})
    else:
        count = len(finetune.snapshots(conf.self_trained or "")) or 1
    ws, cfgs = search.grid(conf.w), conf.cfg or [None]
    most = search.max_images(conf.search, count, ws, cfgs, conf.num, conf.screen(), conf.screen_keep, conf.refine)
    full = search.max_images("grid", count, ws, cfgs, conf.num, conf.num, conf.screen_keep)
    refine = f" + refine {conf.refine:g}" if conf.refine else ""
    halving = f" + halving at n = {conf.screen():,}" if conf.screen() < conf.num else ""
    cfgs = search.refined(conf.cfg, conf.refine) if conf.cfg else None
    return (f"# selection: {conf.search}{halving}{refine} over {count} snapshots: at most {most:,} images, "
            f"full grid {full:,} ({most / full:.3f} of it)" + (f"; cfg reachable: {cfgs}" if cfgs else ""))


def cmd_fid_stats(args, overrides):
    conf = _fid_config(args, overrides)
    if args.dry_run:
        print(json.dumps({"images": args.images, "out": args.out, "fid": dataclasses.asdict(conf)}))
        return
    _need(images=args.images, out=args.out)
    files.check_output(args.out, "file", suffixes=(".npz",))
    result = progress.drain(fid.reference_statistics(args.images, args.out, conf), "fid-stats")
    _say(f"wrote {args.out}: mu and sigma of the Inception features of {result['num']} images")


def cmd_fid(args, overrides):
    conf = _fid_config(args, overrides)
    if args.dry_run:
        print(json.dumps({"images": args.images, "ref": args.ref, "is": bool(args.inception_score), "pr": args.pr,
                          "metrics": args.metrics, "fid": dataclasses.asdict(conf)}))
        return
    _need(images=args.images, ref=args.ref)
    metrics = score.parse_metrics(args.metrics or "fid")
    score.check_metrics(metrics, args.pr, "--metrics", "--pr REAL_SRC")
    _say(_json(progress.drain(fid.evaluate(args.images, args.ref, conf, bool(args.inception_score), args.pr,
                                           metrics), "fid")))


def cmd_diagnose(args, overrides):
    recipe = _recipe(args, overrides, {"family": "family", "ckpt": "model.ckpt"}, ())
    conf = diagnose.DiagnoseConfig(batches=args.batches, repeats=args.repeats, preconditioner=args.preconditioner,
                                   seed=args.seed)
    if args.dry_run:
        print(json.dumps({"family": recipe.family, "ckpt": recipe.model.ckpt, "real": args.real,
                          "synthetic": args.synthetic, **dataclasses.asdict(conf)}))
        return
    _need(ckpt=recipe.model.ckpt, real=args.real, synthetic=args.synthetic)
    if distributed.world() > 1:
        raise NeonError("neon diagnose runs in one process; launch it without torchrun")
    fam, model = _load(recipe)
    data = synthetic.read(args.synthetic)
    result = diagnose.run(fam, model, _real_data(fam, args.real, args.seed), (data, data.labels), conf)
    lo, hi = result["low"], result["high"]
    _say(f"cos_P = {result['cos_p']:+.4f}, 95% interval [{lo:+.4f}, {hi:+.4f}] "
         f"({'negative' if result['cos_p'] < 0 else 'positive'}): {diagnose.ADVICE[result['advice']]}")
    _say(_json(result))


def _real_data(fam, spec: str, seed: int):
    """Real samples and labels: `<family>:N` (families that can draw their true distribution, the
    toy), a synthetic-set directory, or an image source of `neon fid` (its labels where an `.npz`
    has them; otherwise unknown: −1)."""
    if spec.startswith(fam.name + ":"):
        if family.member(fam, "real") is None:
            raise NeonError(f"family {fam.name!r} cannot draw real data; pass images with --real")
        count = spec.split(":", 1)[1]
        if not count.isdigit() or int(count) < 2:
            raise NeonError(f"--real {spec}: expected {fam.name}:N with N >= 2 points")
        return fam.real(int(count), seed)
    if os.path.exists(os.path.join(spec, synthetic.MANIFEST)):
        data = synthetic.read(spec)
        return data, data.labels
    from neon.metrics import images

    src = images.source(spec)
    samples = src.read(range(len(src)))
    found = images.labels(spec, len(samples))
    return samples, found if found is not None else torch.full((len(samples),), -1, dtype=torch.int64)


def cmd_demo(args, overrides):
    if overrides:
        raise NeonError(f"neon demo takes no recipe overrides (got --{overrides[0][0]})")
    demo = _demo("digits" if args.digits else None)
    out = args.out or os.path.join("outputs", "digits" if args.digits else "demo")
    if args.dry_run:
        print(json.dumps({"demo": "digits" if args.digits else "toy", "out": out, "quick": args.quick,
                          "settings": demo.SETTINGS}, default=str))
        return
    if distributed.world() > 1:
        raise NeonError("neon demo runs in one process; launch it without torchrun")
    files.check_output(out, "dir")
    result = demo.run(out, quick=args.quick)
    _say(demo.table(result))
    pictures = "fid_vs_w.png, samples.png" if args.digits else "curves.png"
    _say(f"results: {os.path.join(out, 'results.json')}; pictures in {out}: {pictures}")


def _demo(name: str | None):
    """The toy demo (`neon.toy.demo`), or a demo another package registers as an entry point of the
    group `neon.demos` (the digits experiment: `edm.digits.demo`)."""
    if name is None:
        from neon.toy import demo

        return demo
    found = {e.name: e for e in importlib.metadata.entry_points(group="neon.demos")}
    if name not in found:
        raise NeonError(f"no demo {name!r} is installed (installed: {', '.join(sorted(found)) or 'none'})")
    return found[name].load()


def cmd_report(args, overrides):
    if overrides:
        raise NeonError(f"neon report takes no recipe overrides (got --{overrides[0][0]})")
    if args.dry_run:
        print(json.dumps({"sweep_dir": args.sweep_dir}))
        return
    if distributed.world() > 1:
        raise NeonError("neon report runs in one process; launch it without torchrun")
    _say(report.table(report.run(args.sweep_dir)))


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="neon", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Any recipe field can be set with --section.field VALUE, "
                                            "e.g. --sampler.zeta 1.1 or --finetune.lr 1e-5.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    def verb(name, run, help_text):
        p = verbs.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(run=run)
        p.add_argument("--config", help="YAML recipe")
        p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
        return p

    p = verb("sample", cmd_sample, "draw the synthetic set S from the base model (resumable)")
    _flags(p, family="family name or package.module:attribute", ckpt="base checkpoint", out="output directory",
           num_images=(int, "number of samples", ("--num-images", "--num")), batch_size=(int, "samples per call and process"),
           seed=(int, "seed of sample 0"), shard_size=(int, "samples per shard file"))
    _deterministic_flag(p)
    p = verb("finetune", cmd_finetune, "fine-tune a copy of the base on S (resumable)")
    _flags(p, family="family name or package.module:attribute", ckpt="base checkpoint", data="synthetic set directory",
           out="run directory", images=(int, "total images"), batch_size=(int, "global batch size"),
           lr=(float, "learning rate"), ramp_images=(int, "linear lr ramp length in images"),
           ema_beta=(float, "per-step EMA decay"), snapshot_every=(int, "snapshot interval in images"),
           precision="fp32 | bf16 | fp16")
    _deterministic_flag(p)
    p = verb("merge", cmd_merge, "write θ_neon = (1 + w) base − w self_trained")
    _flags(p, family="family name or package.module:attribute (default: found from the base)", base="base checkpoint", self_trained=(str, "self-trained snapshot", "--self"),
           w=(float, "extrapolation weight"), out="output file")
    p.add_argument("--format", choices=("same", "safetensors"), default="same",
                   help="the base's container (default) or plain safetensors")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="write the merge even when the self-trained weights or the result hold NaN/inf")
    p = verb("sweep", cmd_sweep, "choose w (and cfg) by FID over snapshots")
    _flags(p, family="family name or package.module:attribute", base="base checkpoint",
           self_trained=(str, "snapshots: glob pattern or run directory", "--self"),
           w="grid start:stop:step or a,b,c", cfg=(float, "guidance scales", None, "+"),
           num_images=(int, "samples per evaluation", ("--num-images", "--num")),
           final_num=(int, "samples of the final report"),
           out="directory of results.jsonl", ref="reference statistics .npz",
           batch_size=(int, "samples per call and process"))
    p.add_argument("--inception-weights", help="InceptionV3 weights for image families (fid.inception_weights)")
    _metric_flags(p, "of the final report's two points (sweep.inception_score, sweep.precision_recall)")
    _deterministic_flag(p)
    p = verb("fid-stats", cmd_fid_stats, "write reference statistics (mu, sigma of Inception features) of images")
    _flags(p, images="a folder of PNG/JPEG, an .npz of uint8 [N,H,W,3] images or a synthetic set",
           out="output .npz", inception_weights="InceptionV3 weights file (default: checkpoints/ or download)",
           batch_size=(int, "images per Inception forward and process"))
    p = verb("fid", cmd_fid, "FID of images against reference statistics (and IS, precision/recall); one JSON line")
    _flags(p, images="a folder of PNG/JPEG, an .npz of uint8 [N,H,W,3] images or a synthetic set",
           ref="reference statistics .npz (mu, sigma)",
           inception_weights="InceptionV3 weights file (default: checkpoints/ or download)",
           batch_size=(int, "images per Inception forward and process"))
    _metric_flags(p, "of the images")
    p = verb("diagnose", cmd_diagnose, "will Neon help, and with which sign of w? cos_P of real vs synthetic gradients")
    _flags(p, family="family name or package.module:attribute", ckpt="base checkpoint",
           real="real data: toy:N, a synthetic set, or an image folder/.npz (class-conditional models need "
                "labels: an .npz with a `labels` array)", synthetic="synthetic set directory")
    p.add_argument("--batches", type=int, default=16, help="batches per side (bootstrap units)")
    p.add_argument("--repeats", type=int, default=1, help="loss draws per batch (16 for the toy diffusion model)")
    p.add_argument("--preconditioner", choices=("pooled", "real", "synthetic"), default="pooled",
                   help="batches Adam's second moment is estimated on")
    p.add_argument("--seed", type=int, default=0)
    p = verb("demo", cmd_demo, "Neon on the 2-D toy models (or, with --digits, on real digit images): a table, "
                               "plots and results.json")
    p.add_argument("--digits", action="store_true",
                   help="the digits experiment: an EDM trained on sklearn's digits, Neon against a control")
    p.add_argument("--quick", action="store_true", help="smaller run (under a minute on 2 cores)")
    p.add_argument("--out", help="output directory (default outputs/demo, or outputs/digits with --digits)")
    p = verb("report", cmd_report, "a finished sweep's final table (mean ± sd over seed ranges), compute and pictures")
    p.add_argument("sweep_dir", help="the sweep's output folder (results.jsonl, config.resolved.yaml)")
    return parser


def _flags(parser, **specs):
    """Add --flag options: spec is a help string (str type) or (type, help[, flag name(s)[, nargs]])."""
    for dest, spec in specs.items():
        kind, text, names, nargs = (str, spec, None, None) if isinstance(spec, str) else (tuple(spec) + (None, None))[:4]
        names = (names,) if isinstance(names, str) else names or ("--" + dest.replace("_", "-"),)
        parser.add_argument(*names, dest=dest, type=kind, help=text, nargs=nargs)


def _metric_flags(parser, of: str) -> None:
    """--is and --pr/--precision-recall (None when not given, so a recipe's value stands)."""
    parser.add_argument("--is", dest="inception_score", action="store_true", default=None,
                        help=f"also the Inception score (10 splits) {of}")
    parser.add_argument("--precision-recall", "--pr", dest="pr", metavar="REAL_SRC",
                        help=f"also precision/recall (k=5) {of} against these real images")
    parser.add_argument("--metrics", type=lambda text: score.parse_metrics(text) and text.split(","),
                        help=f"fid,fd_dinov2,prdc: metrics {of} (fd_dinov2 and prdc against --pr's real images)")


def _deterministic_flag(parser) -> None:
    parser.add_argument("--deterministic", action="store_true", default=None,
                        help="bitwise reruns on GPU: deterministic algorithms, no cuDNN autotuning (slower; "
                             "recipe key `deterministic`)")


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


def _recipe(args, overrides, flags, sections) -> Recipe:
    raw = config.load_yaml(args.config) if args.config else {}
    for dest, key in flags.items():
        value = getattr(args, dest, None)
        if value is not None:  # argparse has typed these already
            config.set_dotted(raw, key, value, parse=False)
    for key, value in overrides:
        config.set_dotted(raw, key, value)
    return build_recipe(raw, sections)


def _load(recipe: Recipe):
    """The recipe's family and its base model on this rank's device (in deterministic mode first,
    when the recipe asks for it)."""
    if recipe.deterministic:
        distributed.deterministic()
    fam = family.get(recipe.family)
    return fam, fam.load(recipe.model.ckpt, recipe.model.arch, distributed.device(), codec=recipe.model.codec)


def _fid_config(args, overrides) -> inception.FidConfig:
    """The `fid` section of --config, then the verb's flags, then --fid.* overrides."""
    raw = config.load_yaml(args.config) if args.config else {}
    raw = {"fid": dict(raw.get("fid") or {})}
    for dest, key in FID_FLAGS.items():
        if getattr(args, dest, None) is not None:
            config.set_dotted(raw, key, getattr(args, dest), parse=False)
    for key, value in overrides:
        if not key.startswith("fid."):
            raise NeonError(f"neon {args.verb} takes only --fid.* recipe overrides (got --{key})")
        config.set_dotted(raw, key, value)
    return config.build(inception.FidConfig, raw["fid"], "fid")


def _dry_run(args, recipe) -> bool:
    if args.dry_run:
        print(config.dump_yaml(_resolved(recipe)), end="")
    return args.dry_run


def _resolved(recipe: Recipe) -> dict:
    return {k: v for k, v in config.to_dict(recipe).items() if v is not None}


def _save_resolved(out: str, recipe: Recipe) -> None:
    if distributed.is_main():
        os.makedirs(out, exist_ok=True)
        files.write_text(os.path.join(out, "config.resolved.yaml"), config.dump_yaml(_resolved(recipe)))


@contextlib.contextmanager
def _claimed(directory: str, command: str, keep=lambda name: True):
    """Collective: rank 0 holds the output folder for the body (`neon.files.claim`: the lock,
    and a first run that fails leaves no folder); every rank raises the same NeonError when it is
    taken."""
    stack, error = contextlib.ExitStack(), None
    if distributed.is_main():
        try:
            stack.enter_context(files.claim(directory, command, keep))
        except NeonError as e:
            error = str(e)
    error = distributed.broadcast_object(error)
    if error:
        raise NeonError(error)
    with stack:
        yield


def _json(record: dict) -> str:
    """One JSON line; non-finite numbers become null (JSON has no NaN)."""
    return json.dumps(files.finite_json(record), allow_nan=False)


def _need(**values) -> bool:
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise NeonError(f"missing {', '.join('--' + m for m in missing)} (or set it in --config)")
    return True


def _say(text: str, err: bool = False) -> None:
    if distributed.is_main():
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


if __name__ == "__main__":
    main()
