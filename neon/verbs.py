"""The bodies of the `neon` verbs; the command line itself (which flag sets which key) is `neon.cli`.

Each verb takes the mapping `neon.cli` resolved for it (the --config recipe, the flags at their keys,
the dotted overrides) and whether to stop after printing it as YAML (--dry-run). Then it checks what
it needs, calls one library function (long work drained under the rank-0 progress bar) and prints a
one-line summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import sys

import torch

from neon import (
    config,
    diagnose,
    distributed,
    family,
    finetune,
    log,
    merge,
    plan,
    progress,
    report,
    search,
    stop,
    sweep,
    synthetic,
)
from neon.errors import NeonError
from neon.io import files
from neon.metrics import fid, inception, score
from neon.recipe import Recipe, build_recipe, resolved


def cmd_sample(raw: dict, dry_run: bool) -> None:
    recipe = build_recipe(raw, ("sampler", "synthetic"))
    conf = recipe.synthetic
    if dry_run:
        return _print_yaml(resolved(recipe))
    _need({"--ckpt": recipe.model.ckpt, "--out": conf.out})
    files.check_output(conf.out, "dir")
    fam, model = _load(recipe)
    base = family.local_path(fam, recipe.model.ckpt)  # a hub id: the folder it was fetched into
    sha = files.sha256(base) if distributed.is_main() else None
    base_sha = distributed.broadcast_object(sha)
    with _claimed(conf.out, "neon sample", keep=lambda name: name.startswith("shard-")):
        with stop.catching():  # SIGTERM/SIGUSR1: the shards in progress are finished, then it stops
            progress.drain(synthetic.write(fam, model, recipe.sampler, conf, base_sha), "sample")
        _save_resolved(conf.out, recipe)
    _say(f"synthetic set of {conf.num} samples in {conf.out}")


def cmd_finetune(raw: dict, dry_run: bool) -> None:
    recipe = build_recipe(raw, ("finetune",))
    conf = recipe.finetune
    if dry_run:
        return _print_yaml(resolved(recipe))
    _need({"--ckpt": recipe.model.ckpt, "--data": conf.data, "--out": conf.out})
    files.check_output(conf.out, "dir")
    fam, model = _load(recipe)
    finetune.open_data(conf, fam.name)  # checked before anything is written
    with _claimed(conf.out, "neon finetune", keep=lambda name: name != "stats.jsonl"):
        _save_resolved(conf.out, recipe)
        log.setup(conf.out)
        with stop.catching():  # SIGTERM/SIGUSR1: the step is finished and the training state written
            result = progress.drain(finetune.run(fam, model, conf), "finetune")
    last = f" (last loss {result['loss']:.4f})" if result["loss"] is not None else " (already complete)"
    _say(f"fine-tuned to {conf.total_images} images; snapshots in {conf.out}{last}")


def cmd_merge(raw: dict, dry_run: bool) -> None:
    if dry_run:
        return _print_yaml({"family": raw.get("family"), **raw})  # family None: found from the base
    base, args = raw.get("model", {}).get("ckpt"), raw["merge"]
    _need({"--base": base, "--self": args["self_trained"], "--w": args["w"], "--out": args["out"]})
    _one_process("merge")
    files.check_output(args["out"], "file")
    fam = family.get(raw["family"]) if raw.get("family") else None  # else found from the base (family.detect)
    merge.merge_files(base, args["self_trained"], args["w"], args["out"], args["format"], family=fam,
                      allow_nonfinite=args["allow_nonfinite"])
    _say(f"wrote {args['out']} = (1 + {args['w']}) base − {args['w']} self_trained")


def cmd_sweep(raw: dict, dry_run: bool) -> None:
    recipe = build_recipe(raw, ("sampler", "sweep", "fid"))
    conf = recipe.sweep
    if dry_run:
        _print_yaml(resolved(recipe))
        try:  # the fine-tune section, where the recipe has one, tells how many snapshots there will be
            ft = build_recipe(raw, ("finetune",)).finetune
        except NeonError:
            ft = None
        return _say(_selection_line(conf, ft))
    _need({"--base": recipe.model.ckpt, "--self": conf.self_trained})
    sweep.snapshot_paths(conf)  # before the default output folder is derived from them
    out = sweep.output_dir(conf)
    files.check_output(out, "dir")
    fam, model = _load(recipe)
    with _claimed(out, "neon sweep"):
        _save_resolved(out, recipe)
        work = sweep.run(fam, model, recipe.model.ckpt, recipe.sampler, conf, recipe.fid)
        with stop.catching():  # SIGTERM/SIGUSR1: the evaluation in progress is finished and recorded
            result = progress.drain(work, "sweep", on_info=lambda record: _say(_json(record), err=True))
        _say(_json(result.to_dict()))
        if distributed.is_main():  # the pictures of `neon report`: fid_vs_w.png, fid_w_cfg.png, samples.png
            report.run(out, model)


def _selection_line(conf: sweep.SweepConfig, ft: finetune.FinetuneConfig | None) -> str:
    """A YAML comment: the images the selection generates at most against the full grid's, and the cfg
    values it can reach (the snapshots the recipe's fine-tune writes, else those on disk)."""
    if ft is not None and ft.out and conf.self_trained == ft.out:
        count = finetune.snapshot_count(ft)
    else:
        count = len(finetune.snapshots(conf.self_trained or "")) or 1
    ws, cfgs = search.grid(conf.w), conf.cfg or [None]
    most = search.max_images(
        conf.search, count, ws, cfgs, conf.num, conf.screen(), conf.screen_keep, conf.refine
    )
    full = search.max_images("grid", count, ws, cfgs, conf.num, conf.num, conf.screen_keep)
    refine = f" + refine {conf.refine:g}" if conf.refine else ""
    halving = f" + halving at n = {conf.screen():,}" if conf.screen() < conf.num else ""
    reachable = search.refined(conf.cfg, conf.refine) if conf.cfg else None
    return (
        f"# selection: {conf.search}{halving}{refine} over {count} snapshots: at most {most:,} images, "
        f"full grid {full:,} ({most / full:.3f} of it)"
        + (f"; cfg reachable: {reachable}" if reachable else "")
    )


def cmd_fid_stats(raw: dict, dry_run: bool) -> None:
    conf = config.build(inception.FidConfig, raw.get("fid"), "fid")
    if dry_run:
        return _print_yaml({**raw, "fid": conf})
    _need({"--images": raw["images"], "--out": raw["out"]})
    files.check_output(raw["out"], "file", suffixes=(".npz",))
    result = progress.drain(fid.reference_statistics(raw["images"], raw["out"], conf), "fid-stats")
    _say(f"wrote {raw['out']}: mu and sigma of the Inception features of {result['num']} images")


def cmd_fid(raw: dict, dry_run: bool) -> None:
    conf = config.build(inception.FidConfig, raw.get("fid"), "fid")
    if dry_run:
        return _print_yaml({**raw, "fid": conf})
    _need({"--images": raw["images"], "--ref": raw["ref"]})
    metrics = raw["metrics"] or ["fid"]
    score.check_metrics(metrics, raw["pr"], "--metrics", "--pr REAL_SRC")
    _say(
        _json(
            progress.drain(
                fid.evaluate(raw["images"], raw["ref"], conf, raw["is"], raw["pr"], metrics), "fid"
            )
        )
    )


def cmd_diagnose(raw: dict, dry_run: bool) -> None:
    args = raw.pop("diagnose")
    real, data_dir = args.pop("real"), args.pop("synthetic")
    recipe, conf = build_recipe(raw, ()), diagnose.DiagnoseConfig(**args)
    if dry_run:
        diagnosis = {"real": real, "synthetic": data_dir, **dataclasses.asdict(conf)}
        return _print_yaml({**resolved(recipe), "diagnose": diagnosis})
    _need({"--ckpt": recipe.model.ckpt, "--real": real, "--synthetic": data_dir})
    _one_process("diagnose")
    fam, model = _load(recipe)
    data = synthetic.read(data_dir)
    result = diagnose.run(fam, model, _real_data(fam, real, conf.seed), (data, data.labels), conf)
    lo, hi, sign = result["low"], result["high"], "negative" if result["cos_p"] < 0 else "positive"
    _say(f"cos_P = {result['cos_p']:+.4f}, 95% interval [{lo:+.4f}, {hi:+.4f}] "
         f"({sign}): {diagnose.ADVICE[result['advice']]}")
    _say(_json(result))


def cmd_demo(raw: dict, dry_run: bool) -> None:
    name = raw["demo"] or "toy"
    demo = _demo(name)
    out = raw["out"] or os.path.join("outputs", "demo" if name == "toy" else name)
    if dry_run:
        return _print_yaml({"demo": name, "out": out, "quick": raw["quick"], "settings": demo.SETTINGS})
    _one_process("demo")
    files.check_output(out, "dir")
    result = demo.run(out, quick=raw["quick"])
    _say(demo.table(result))
    pictures = ", ".join(sorted(f for f in os.listdir(out) if f.endswith(".png")))
    _say(f"results: {os.path.join(out, 'results.json')}; pictures in {out}: {pictures}")


def cmd_report(raw: dict, dry_run: bool) -> None:
    if dry_run:
        return _print_yaml(raw)
    _one_process("report")
    _say(report.table(report.run(raw["sweep_dir"])))


def cmd_plan(raw: dict, dry_run: bool) -> None:
    args = {key: raw.pop(key) for key in ("gpus", "gpu_memory", "gpu_tflops", "utilization", "json")}
    path = raw.pop("recipe")
    recipe = build_recipe(_merged(config.load_yaml(path), raw) if path else raw)
    if dry_run:
        return _print_yaml({**resolved(recipe), "plan": args})
    result = plan.plan(recipe, args["gpus"], args["gpu_memory"], args["gpu_tflops"], args["utilization"])
    _say(_json(result) if args["json"] else plan.table(result))


def _merged(recipe: dict, changes: dict) -> dict:
    """`recipe` with the values of `changes` (flags and dotted overrides) put in, section by section."""
    out = dict(recipe)
    for key, value in changes.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if nested else value
    return out


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


def _entry_points() -> dict:
    """{name: entry point} of the group `neon.demos`: the demos other packages install."""
    return {e.name: e for e in importlib.metadata.entry_points(group="neon.demos")}


def demo_names() -> list[str]:
    """The installed demos: 'toy' and the entry points of the group `neon.demos`."""
    return ["toy", *sorted(_entry_points())]


def _demo(name: str):
    """The toy demo (`neon.toy.demo`), or a demo another package registers as an entry point of the
    group `neon.demos`."""
    if name == "toy":
        from neon.toy import demo

        return demo
    found = _entry_points()
    if name not in found:
        raise NeonError(f"no demo {name!r} is installed (installed: {', '.join(demo_names())})")
    return found[name].load()


def _load(recipe: Recipe):
    """The recipe's family and its base model on this rank's device (in deterministic mode first,
    when the recipe asks for it)."""
    if recipe.deterministic:
        distributed.deterministic()
    fam = family.get(recipe.family)
    return fam, fam.load(recipe.model.ckpt, recipe.model.arch, distributed.device(), codec=recipe.model.codec)


def _need(values: dict) -> None:
    """Refuse to start while a required flag (named by the keys of `values`) has no value."""
    missing = [flag for flag, value in values.items() if value is None]
    if missing:
        raise NeonError(f"missing {', '.join(missing)} (or set it in --config)")


def _one_process(verb: str) -> None:
    if distributed.world() > 1:
        raise NeonError(f"neon {verb} runs in one process; launch it without torchrun")


def _print_yaml(mapping: dict) -> None:
    """--dry-run: the verb's resolved mapping as YAML (what config.resolved.yaml would hold)."""
    print(config.dump_yaml(mapping), end="")


def _save_resolved(out: str, recipe: Recipe) -> None:
    if distributed.is_main():
        os.makedirs(out, exist_ok=True)
        files.write_text(os.path.join(out, "config.resolved.yaml"), config.dump_yaml(resolved(recipe)))


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


def _say(text: str, err: bool = False) -> None:
    if distributed.is_main():
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
