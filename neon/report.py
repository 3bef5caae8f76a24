"""`neon report SWEEP_DIR`: a sweep's final table with error bars, what the run cost, and its pictures.

It reads files only: the sweep folder's `config.resolved.yaml` (written by `neon sweep`) and
`results.jsonl`; through `sweep.self_trained` the fine-tune run (its snapshots, named by the images
they have seen, and its own `config.resolved.yaml`); through that run's `finetune.data` the synthetic
set's `manifest.json`. Paths recorded relative are read relative to the working directory, so run it
where the sweep ran.

`run(sweep_dir)` returns {'summary': the `neon.summary.Summary` (the chosen point, the evidence, the final
metrics as mean, sd and min over the seed ranges, the paired comparison and its verdict, the gain and
whether it exceeds the spread),
'compute': `compute`, 'pictures': name -> path written (None when not written), 'notes': lines
saying what was left out and why}, and writes into `sweep_dir`:

* `fid_vs_w.png` (`neon.plots.SIZE_FID`): FID against w at the chosen cfg, one curve per snapshot
  and number of samples n (a search scores few points at the full n);
* `fid_w_cfg.png` (`neon.plots.SIZE_HEATMAP`), where two or more cfg values were swept: FID over
  (w, cfg) for the chosen snapshot, at the n with the most points scored;
* `samples.png`: the base and Neon (the chosen point) on the same seeds and labels (the first
  seeds of the final range), with the evaluation sampler: image families a row of SAMPLE_IMAGES
  each (`neon.plots.sample_grid`), point families (the toy) SAMPLE_POINTS points each, with the
  family's real points where it has `real` (`neon.plots.scatter`, `SIZE_SCATTER`).

Compute (`compute`), in images and in base forward-pass equivalents:

* generated: the synthetic set (its manifest's `num`), the selection (every evaluation's n), the
  final report (n per range and point), and any other evaluation in results.jsonl;
* fine-tuned: the run's images (its last snapshot) and the chosen snapshot's;
* with `model.base_training_images`: the fine-tune as a % of the base's training (the chosen
  snapshot: the paper's "extra compute"; and the whole run), and the whole Neon run (the run's
  fine-tune plus every generated image) in forward passes as a % of the base's training. One
  training image counts 3 forward passes (the backward pass costs about two); one generated image
  counts the sampler's steps (`num_steps` or `steps`) where it has them, else 1, stated as a lower
  bound. Steps are a rough count: Heun samplers evaluate the network 2·steps − 1 times, and
  guidance doubles each evaluation.
"""

import dataclasses
import os

import numpy as np

from neon import config, distributed, evaluate, finetune, plots, search, sweep, synthetic
from neon import family as neon_family
from neon import summary as neon_summary
from neon.errors import NeonError

RESOLVED = "config.resolved.yaml"
SAMPLE_IMAGES = 8  # per row of samples.png, for image families
SAMPLE_POINTS = 1000  # per panel of samples.png, for point families
TRAIN_PASSES = 3  # forward-pass equivalents of one training image (forward + backward)
STEP_FIELDS = ("num_steps", "steps")  # sampler fields that count network evaluations per sample


def run(sweep_dir: str, model=None) -> dict:
    """Read a sweep folder (and the run and synthetic set it names), write its pictures; the report
    (module docstring). `model`: the base already loaded (`neon sweep` passes its own), else it is
    loaded from the recorded `model` section. NeonError when the folder holds no sweep of `neon sweep`."""
    raw = _resolved(sweep_dir)
    fam = neon_family.get(raw["family"])
    conf = dataclasses.replace(config.build(sweep.SweepConfig, raw.get("sweep"), "sweep"), out=sweep_dir)
    model_conf = config.build(neon_family.ModelConfig, raw.get("model"), "model")
    sampler = config.build(fam.Sampler, raw.get("sampler"), "sampler")
    try:
        paths = sweep.snapshot_paths(conf)
    except NeonError as e:
        raise NeonError(f"{sweep_dir}: {e} (run neon report where the sweep ran)") from None
    records = sweep.load_results(sweep_dir)
    result = neon_summary.summary(records, conf, paths)
    notes = []
    pictures = {"fid_vs_w": _fid_vs_w(records, conf, paths, result, sweep_dir)}
    if len(conf.cfg or []) > 1:
        pictures["fid_w_cfg"] = _fid_w_cfg(records, conf, paths, result, sweep_dir)
    else:
        pictures["fid_w_cfg"] = None
        notes.append("fid_w_cfg.png: not written (cfg was not swept)")
    pictures["samples"] = _samples(fam, model_conf, sampler, conf, result, sweep_dir, model)
    return {"summary": result, "compute": compute(records, result, model_conf, sampler, paths),
            "pictures": pictures, "notes": notes}


def compute(records: list[dict], summary: dict, model_conf, sampler, paths: list[str]) -> dict:
    """The images a Neon run generated and fine-tuned on, and the run against the base's training
    (module docstring). Unknown numbers are None."""
    run_dir = os.path.dirname(paths[0])
    synthetic_images = _synthetic_num(run_dir)
    # a point scored twice (a final point redone for IS) was generated twice
    every = sum(r["num"] for r in records)
    selection, final = summary.selection_images, summary.final.images if summary.final else 0
    generated = every + (synthetic_images or 0)
    run_images = max((finetune.images_seen(p) or 0 for p in finetune.snapshots(run_dir)), default=0) or None
    chosen = finetune.images_seen(summary.snapshot) if summary.snapshot != sweep.BASE else 0
    steps = next(
        (getattr(sampler, f) for f in STEP_FIELDS if isinstance(getattr(sampler, f, None), int)), None
    )
    result = {"synthetic_images": synthetic_images, "selection_images": selection, "final_images": final,
              "other_images": every - selection - final, "generated_images": generated,
              "finetune_images": run_images, "chosen_snapshot_images": chosen,
              "base_training_images": model_conf.base_training_images, "steps_per_image": steps,
              "finetune_percent": None, "finetune_run_percent": None, "forward_passes": None,
              "forward_percent": None}
    base = model_conf.base_training_images
    if base:
        if chosen is not None:
            result["finetune_percent"] = 100 * chosen / base
        if run_images is not None:
            result["finetune_run_percent"] = 100 * run_images / base
        passes = TRAIN_PASSES * (run_images or 0) + (steps or 1) * generated
        result["forward_passes"] = passes
        result["forward_percent"] = 100 * passes / (TRAIN_PASSES * base)
    return result


def table(result: dict) -> str:
    """The report as text: the chosen point and its evidence, the final table (mean ± sd and min per
    metric over the seed ranges, the paired comparison, the gain against the spread), the compute lines
    and the pictures."""
    s, c = result["summary"], result["compute"]
    cfg = "" if s.cfg is None else f", cfg {s.cfg:g}"
    lines = [
        f"search {s.search}: chosen {_name(s.snapshot)}, w {s.w:+g}{cfg}: FID {_num(s.fid)} at n = {s.num:,}",
        "evidence: " + "; ".join(f"{e['points']} points at n = {e['n']:,}" for e in s.evidence),
    ]
    final = s.final
    if final is not None:
        ranges = final.seeds
        lines += [
            "",
            f"final report: {len(ranges)} seed range{'s' if len(ranges) > 1 else ''} of "
            f"{ranges[0][1]:,} samples from seed {ranges[0][0]:,}",
            f"compared: the base at its own cfg ({_cfg(final.base_cfg)}) and Neon at the chosen point "
            f"({_name(s.snapshot)}, w {s.w:+g}, cfg {_cfg(final.cfg)}), on the same seed ranges",
            f"{'metric':<10} {'base, cfg ' + _cfg(final.base_cfg):>30} {'neon, cfg ' + _cfg(final.cfg):>30}",
        ]
        for metric in sweep.METRICS:
            if metric in final.base or metric in final.neon:
                lines.append(
                    f"{metric:<10} {_cell(final.base.get(metric)):>30} {_cell(final.neon.get(metric)):>30}"
                )
        pair = final.paired.get("fid")
        if pair is not None and pair.low is not None:
            lines.append(
                f"neon − base, paired by range: FID {pair.mean:+.4g} ± {pair.sd:.2g}, 95% interval "
                f"[{pair.low:+.4g}, {pair.high:+.4g}], {pair.improved} of {len(pair.differences)} ranges "
                f"improved: {final.verdict}"
            )
        if final.gain is not None:
            verdict = ("(one range: no spread)" if final.spread is None else
                       f"{'exceeds' if final.gain_exceeds_spread else 'does not exceed'} the spread "
                       f"{_num(final.spread)} (the larger sd)")
            lines.append(f"gain (base − neon, mean FID): {final.gain:+.4g} {verdict}")
    else:
        lines += ["", "final report: none (sweep.final_num is 0)"]
    other = f" + {c['other_images']:,} (other results)" if c["other_images"] else ""
    lines += [
        "",
        "compute:",
        f"  generated: {_count(c['synthetic_images'])} (S) + {c['selection_images']:,} (selection) + "
        f"{c['final_images']:,} (final){other} = {c['generated_images']:,} images",
        f"  fine-tuned: {_count(c['finetune_images'])} images (the run), "
        f"{_count(c['chosen_snapshot_images'])} "
        f"(the chosen snapshot)",
    ]
    if c["base_training_images"]:
        steps = (f"{c['steps_per_image']} per generated image (the sampler's steps)" if c["steps_per_image"]
                 else "1 per generated image (a lower bound: the sampler names no steps)")
        lines += [
            f"  base training: {c['base_training_images']:,} images (model.base_training_images)",
            f"  fine-tune: {_pct(c['finetune_percent'])} of the base's training images (chosen snapshot), "
            f"{_pct(c['finetune_run_percent'])} (the whole run)",
            f"  whole Neon run: {c['forward_passes']:,.0f} forward passes = "
            f"{_pct(c['forward_percent'])} of the "
            f"base's training ({TRAIN_PASSES} per training image, {steps})",
        ]
    else:
        lines.append("  base training: unknown (set model.base_training_images); counted in images only")
    lines += ["", "pictures: " + ", ".join(p for p in result["pictures"].values() if p)] + result["notes"]
    return "\n".join(lines)


def _fid_vs_w(records, conf, paths, summary, out) -> str:
    curves = {}
    ns = sorted({e["n"] for e in summary.evidence}, reverse=True)
    for path in paths:
        for n in ns:
            ws, fids = sweep.curve(records, conf, path, summary.cfg, n)
            if len(ws) > 1 or (ws and ws != [0.0]):
                curves[f"{_name(path)}" + (f" (n = {n:,})" if len(ns) > 1 else "")] = (ws, _nan(fids))
    cfg = "" if summary.cfg is None else f", cfg {summary.cfg:g}"
    return plots.fid_vs_w(
        curves, os.path.join(out, "fid_vs_w.png"), title=f"FID against w ({conf.search}{cfg})"
    )


def _fid_w_cfg(records, conf, paths, summary, out) -> str:
    """The heat map of the chosen snapshot (of the first snapshot when the base was chosen), at the
    n with the most points scored."""
    snapshot = summary.snapshot if summary.snapshot != sweep.BASE else paths[0]
    rows = [r for r in sweep.selection(records, conf, paths) if r["snapshot"] in (snapshot, sweep.BASE)]
    ns = [r["num"] for r in rows]
    n = max(set(ns), key=lambda m: (ns.count(m), m))
    ws, cfgs = sorted(set(search.grid(conf.w)) | {0.0}), sorted(conf.cfg)
    values = np.full((len(cfgs), len(ws)), np.nan)
    for r in rows:  # refinement points off the grid are left out of the picture
        if r["num"] == n and r["fid"] is not None and r["w"] in ws and r["cfg"] in cfgs:
            values[cfgs.index(r["cfg"]), ws.index(r["w"])] = r["fid"]
    return plots.fid_w_cfg(ws, cfgs, values, os.path.join(out, "fid_w_cfg.png"),
                           title=f"FID over (w, cfg): {_name(snapshot)}, n = {n:,}")


def _samples(fam, model_conf, sampler, conf, summary, out, model=None) -> str:
    """samples.png: the base and the chosen point drawn on the same seeds and labels, through
    `neon.evaluate.evaluate` (the network's weights are changed)."""
    if model is None:
        model = fam.load(model_conf.ckpt, model_conf.arch, distributed.device(), codec=model_conf.codec)
    fields = dict(conf.sampler)
    if summary.cfg is not None:
        fields["cfg"] = summary.cfg
    sampler = dataclasses.replace(sampler, **fields)
    count = SAMPLE_POINTS if model.image_size is None else SAMPLE_IMAGES
    start = conf.final_seed_base if conf.final_num else conf.seed_base
    base = neon_family.read_checkpoint(fam, model_conf.ckpt).weights
    self_trained = (neon_family.read_checkpoint(fam, summary.snapshot).weights
                    if summary.snapshot != sweep.BASE else None)
    drawn = {name: evaluate.evaluate(fam, model, base, sampler, (start, count), conf.batch_size, None,
                                     self_trained=self_trained, w=w, keep_samples=True)["samples"].numpy()
             for name, w in (("base", 0.0), (f"neon (w {summary.w:+g})", summary.w))}
    path = os.path.join(out, "samples.png")
    if model.image_size is None:
        if neon_family.member(fam, "real") is not None:
            drawn["real"] = fam.real(count, start)[0].numpy()
        return plots.scatter(drawn, path, title=f"{count:,} samples, seeds from {start:,}")
    return plots.sample_grid({k: v.transpose(0, 2, 3, 1) for k, v in drawn.items()}, path)


def _resolved(sweep_dir: str) -> dict:
    path = os.path.join(sweep_dir, RESOLVED)
    if not os.path.exists(path):
        raise NeonError(
            f"{sweep_dir} holds no {RESOLVED}: neon report reads the recipe `neon sweep` wrote there"
        )
    raw = config.load_yaml(path)
    if not raw.get("family"):
        raise NeonError(f"{path} names no family")
    return raw


def _synthetic_num(run_dir: str) -> int | None:
    """The number of samples of the synthetic set the run in `run_dir` was fine-tuned on, or None."""
    resolved = os.path.join(run_dir, RESOLVED)
    data = (
        (config.load_yaml(resolved).get("finetune") or {}).get("data") if os.path.exists(resolved) else None
    )
    if not data or not os.path.exists(os.path.join(data, synthetic.MANIFEST)):
        return None
    return synthetic.load_manifest(data)["num"]


def _cell(stats) -> str:
    if stats is None or stats.mean is None:
        return "-"
    return (
        f"{stats.mean:.4g}"
        + (f" ± {stats.sd:.2g}" if stats.sd is not None else "")
        + f" (min {stats.min:.4g})"
    )


def _cfg(value) -> str:
    return "the sampler's" if value is None else f"{value:g}"


def _name(snapshot: str) -> str:
    return os.path.basename(snapshot)


def _nan(values):
    return [np.nan if v is None else v for v in values]


def _num(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _count(value) -> str:
    return "?" if value is None else f"{value:,}"


def _pct(value) -> str:
    return "?" if value is None else f"{value:.3g}%"
