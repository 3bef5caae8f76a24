"""Choosing w: evaluate θ_neon = (1 + w) θ_base − w θ_self_trained over a grid of (snapshot, w, cfg).

Every evaluation draws `num` samples with the seeds [seed_base, seed_base + num) — the same seeds
for every grid point, so differences between points are not sampling noise — and scores them
through `neon.metrics.score` (the project's one scoring path) by the Fréchet distance between the
samples' features and reference statistics. θ of the base and of every snapshot is read with
`neon.family.read_checkpoint`, as `neon merge` reads it. Each evaluation is
one line of `results.jsonl`; a line already there is not computed again, so an interrupted sweep
resumes. The final report re-evaluates the best point (and the base) on the disjoint seed range
[final_seed_base, final_seed_base + final_num), where asked with the Inception score and
precision/recall as well (image families: those points take all their features from Inception).

Merged weights are built in memory (no files); `neon merge` writes the chosen one to disk.
"""

import dataclasses
import json
import logging
import os
import time

import numpy as np
import torch

from neon import distributed, finetune, merge
from neon import family as neon_family
from neon.errors import NeonError
from neon.metrics import fid, inception, score

logger = logging.getLogger(__name__)

RESULTS = "results.jsonl"
BASE = "base"  # the `snapshot` of w = 0 evaluations: they do not depend on the snapshot


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The recipe's `sweep` section."""

    self_trained: str | None = None
    """Snapshots to try: a glob pattern or a run directory (default: finetune.out)."""
    w: str | list[float] = "0:2:0.25"
    """Extrapolation weights: 'start:stop:step' (stop included), 'a,b,c', or a list."""
    cfg: list[float] | None = None
    """Guidance scales to try jointly with w (families whose sampler has a `cfg` field)."""
    num: int = 1000
    """Samples per evaluation while selecting."""
    final_num: int = 0
    """Samples for the final report of the best point and the base (0: no final report)."""
    seed_base: int = 1_000_000
    """First seed of the selection range."""
    final_seed_base: int = 2_000_000
    """First seed of the final range (disjoint from the selection range)."""
    batch_size: int = 256
    """Samples per sampler call, per process."""
    out: str | None = None
    """Directory of results.jsonl (default: <directory of the snapshots>/sweep)."""
    ref: str | None = None
    """Reference statistics `.npz`, a path or a URL (default: the family's built-in reference, e.g. the
    toy's truth)."""
    sampler: dict = dataclasses.field(default_factory=dict)
    """Sampler fields to change for evaluation only (the toy appendix scores ζ = 1, τ = 1 samplers)."""
    inception_score: bool = False
    """Also the Inception score (10 splits) of the final report's two points (image families)."""
    precision_recall: str | None = None
    """An image source of real images: also precision/recall (k = 5) of the final report's two points
    against them (image families)."""

    def __post_init__(self):
        if self.num < 2 or self.final_num < 0 or self.batch_size <= 0:
            raise NeonError("sweep.num must be >= 2, sweep.final_num >= 0 and sweep.batch_size > 0")
        if self.final_num and not (self.final_seed_base >= self.seed_base + self.num
                                   or self.final_seed_base + self.final_num <= self.seed_base):
            raise NeonError("sweep: the final seed range overlaps the selection seed range")
        if (self.inception_score or self.precision_recall) and not self.final_num:
            raise NeonError("sweep.inception_score and sweep.precision_recall score the final report: "
                            "set sweep.final_num")
        if self.inception_score and self.final_num < fid.IS_SPLITS:
            raise NeonError(f"sweep.inception_score needs sweep.final_num >= {fid.IS_SPLITS}")
        if self.precision_recall and self.final_num <= fid.PR_NEIGHBOURS:
            raise NeonError(f"sweep.precision_recall needs sweep.final_num > {fid.PR_NEIGHBOURS}")
        grid(self.w)


def grid(spec) -> list[float]:
    """The w values of a spec: '0:2:0.25' → [0, 0.25, …, 2]; '0,0.5' or [0, 0.5] as given."""
    if isinstance(spec, (int, float)):
        values = [float(spec)]
    elif isinstance(spec, (list, tuple)):
        values = [float(v) for v in spec]
    else:
        try:
            if ":" in spec:
                start, stop, step = (float(v) for v in spec.split(":"))
                if step <= 0 or stop < start:
                    raise ValueError
                count = int(round((stop - start) / step)) + 1
                values = [round(start + i * step, 10) for i in range(count) if start + i * step <= stop + 1e-9]
            else:
                values = [float(v) for v in spec.split(",")]
        except ValueError:
            raise NeonError(f"bad w grid {spec!r}: use start:stop:step, a,b,c or a list") from None
    if not values or not all(np.isfinite(values)):
        raise NeonError(f"bad w grid {spec!r}: values must be finite")
    return values


def run(family, model, base_path: str, sampler, conf: SweepConfig,
        fid_conf: inception.FidConfig = inception.FidConfig()):
    """Collective: evaluate the grid, then the final report. Yields each new result record (a dict,
    as written to results.jsonl); records already in the file are skipped, not yielded. Returns
    (as the generator's value) the report: the best point and, with a final report, the final
    metrics of the base and the best point (`report`)."""
    paths = finetune.snapshots(conf.self_trained) if conf.self_trained else []
    if not paths:
        raise NeonError(f"no snapshots match {conf.self_trained!r}")
    out = output_dir(conf)
    ref_stats = score.reference(family, conf.ref)
    if conf.cfg and "cfg" not in {f.name for f in dataclasses.fields(sampler)}:
        raise NeonError(f"sweep.cfg: the {family.name} sampler has no guidance scale `cfg`")
    base_sd = {k: v.clone() for k, v in neon_family.read_checkpoint(family, base_path).weights.items()}
    net = model.net
    done = {_key(r) for r in load_results(out)}
    cfgs = conf.cfg or [None]
    points = [(BASE, 0.0, c) for c in cfgs]
    points += [(p, w, c) for p in paths for w in grid(conf.w) if w != 0 for c in cfgs]
    selection = (conf.seed_base, conf.num)
    scoring = (sampler, conf, fid_conf, ref_stats, out)
    for snapshot, w, c in points:
        if _key({"snapshot": snapshot, "w": w, "cfg": c, "seeds": list(selection)}) in done:
            continue
        yield _evaluate(family, model, net, base_sd, snapshot, w, c, selection, *scoring)
    if conf.final_num:
        records = load_results(out)
        best = best_point(records, conf, paths)
        final = (conf.final_seed_base, conf.final_num)
        asked = _asked(conf)
        done = {_key(r) for r in records if asked <= set(r)}  # a final point lacking an asked metric is redone
        real = None  # read once, and only when a final point needs it
        for snapshot, w in sorted({(BASE, 0.0), (best["snapshot"], best["w"])}):
            if _key({"snapshot": snapshot, "w": w, "cfg": best["cfg"], "seeds": list(final)}) not in done:
                if conf.precision_recall and real is None:
                    real = score.real_features(conf.precision_recall, fid_conf)
                yield _evaluate(family, model, net, base_sd, snapshot, w, best["cfg"], final, *scoring,
                                conf.inception_score, real)
    net.load_state_dict(base_sd)
    return report(load_results(out), conf, paths)


def report(records: list[dict], conf: SweepConfig, paths: list[str] | None = None) -> dict:
    """The sweep's summary: the best selection point and, with a final report, the final FID (and
    IS, precision/recall where asked) of the base and of the best point, and where the results are."""
    best = best_point(records, conf, paths)
    summary = {"best_snapshot": best["snapshot"], "best_w": best["w"], "best_cfg": best["cfg"],
               "best_fid": best["fid"], "results": os.path.join(output_dir(conf), RESULTS)}
    if conf.final_num:
        finals = {(r["snapshot"], r["w"]): r for r in records if r["seeds"] == [conf.final_seed_base, conf.final_num]
                  and r["cfg"] == best["cfg"]}
        for name, point in (("base", (BASE, 0.0)), ("best", (best["snapshot"], best["w"]))):
            final = finals.get(point, {})
            for metric in ("fid", "is", "is_std", "precision", "recall"):
                if metric == "fid" or metric in final:
                    summary[f"final_{name}_{metric}"] = final.get(metric)
    return summary


def output_dir(conf: SweepConfig) -> str:
    if conf.out:
        return conf.out
    paths = finetune.snapshots(conf.self_trained or "")
    return os.path.join(os.path.dirname(paths[0]) if paths else ".", "sweep")


def load_results(out: str) -> list[dict]:
    """The records of `out/results.jsonl` (empty when there is none)."""
    path = os.path.join(out, RESULTS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def best_point(records: list[dict], conf: SweepConfig, paths: list[str] | None = None) -> dict:
    """The selection record with the lowest FID among this sweep's grid."""
    paths = set(paths if paths is not None else finetune.snapshots(conf.self_trained or ""))
    ws, cfgs = set(grid(conf.w)) | {0.0}, set(conf.cfg or [None])
    chosen = [r for r in records if r["seeds"] == [conf.seed_base, conf.num] and r["w"] in ws
              and r["cfg"] in cfgs and (r["snapshot"] == BASE or r["snapshot"] in paths)]
    if not chosen:
        raise NeonError("the sweep has no results yet")
    return min(chosen, key=lambda r: r["fid"])


def curve(records: list[dict], conf: SweepConfig, snapshot: str, cfg_value=None) -> tuple[list[float], list[float]]:
    """(w, fid) of one snapshot's selection results, sorted by w, the base at w = 0 included."""
    points = {r["w"]: r["fid"] for r in records if r["seeds"] == [conf.seed_base, conf.num]
              and r["cfg"] == cfg_value and r["snapshot"] in (snapshot, BASE)}
    ws = sorted(points)
    return ws, [points[w] for w in ws]


def _evaluate(family, model, net, base_sd, snapshot, w, c, seeds, sampler, conf, fid_conf, ref_stats, out,
              with_is: bool = False, real: torch.Tensor | None = None) -> dict:
    started = time.time()
    if snapshot == BASE:
        net.load_state_dict(base_sd)
    else:
        self_sd = neon_family.read_checkpoint(family, snapshot).weights
        net.load_state_dict(merge.extrapolate(base_sd, self_sd, w))
    fields = dict(conf.sampler)
    if c is not None:
        fields["cfg"] = c
    metrics = score.generate_and_score(family, model, dataclasses.replace(sampler, **fields), seeds, conf.batch_size,
                                       fid_conf, ref_stats, with_is, real)
    record = {"snapshot": snapshot, "w": w, "cfg": c, "num": seeds[1], "seeds": list(seeds), **metrics,
              "seconds": round(time.time() - started, 3)}
    if real is not None:
        record["real"] = conf.precision_recall
    if distributed.is_main():
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, RESULTS), "a") as f:
            f.write(json.dumps(record) + "\n")
    distributed.barrier()
    return record


def _asked(conf: SweepConfig) -> set[str]:
    """The metric keys a final record must hold."""
    return ({"is"} if conf.inception_score else set()) | ({"precision"} if conf.precision_recall else set())


def _key(record: dict) -> tuple:
    return record["snapshot"], float(record["w"]), record["cfg"], tuple(record["seeds"])
