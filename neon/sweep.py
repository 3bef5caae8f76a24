"""Choosing w: evaluate θ_neon = (1 + w) θ_base − w θ_self_trained over the grid of (snapshot, w, cfg).

The grid is every snapshot × the w values × the cfg values (w = 0 is the base, scored once per cfg);
`sweep.search`, `screen_num`, `screen_keep` and `refine` say which points are scored (`neon.search`).
The chosen point is the lowest FID at n = num among the grid's points (and refinements) in results.jsonl.

Every evaluation of n samples uses the seeds [seed_base, seed_base + n), the same for every point, and
is scored by `neon.evaluate.evaluate` (θ read with `neon.family.read_checkpoint`, as `neon merge` does;
merged in the network's own memory). Each is one line of `results.jsonl` (snapshot, w, cfg, num, seeds,
sampler overrides, metrics, wall time; non-finite metrics as null); a line already there with the same
key is not computed again, so an interrupted sweep resumes and a grid after a search reuses its points.

The final report scores the chosen (snapshot, w, cfg) and the base at its own cfg (`base_cfg`) on
`final_seeds` disjoint ranges of `final_num` samples from `final_seed_base`, with `sweep.metrics`,
the Inception score and precision/recall where asked. The `Summary` gives mean, sd and min per metric
(`neon.evaluate.summarize`), the paired comparison by range (`neon.evaluate.paired`) and its verdict,
and whether the gain (base − chosen, mean FID) exceeds the spread (the larger FID sd).
"""

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator

from neon import distributed, evaluate, finetune, merge, search, stop, synthetic
from neon import family as neon_family
from neon import summary as neon_summary
from neon.errors import NeonError
from neon.io import files
from neon.metrics import fid, inception, score
from neon.progress import Progress

logger = logging.getLogger(__name__)

RESULTS = "results.jsonl"
BASE = search.BASE  # the `snapshot` of w = 0 evaluations: they do not depend on the snapshot
METRICS = ("fid", "fd_dinov2", "is", "is_std", "precision", "recall", "density", "coverage")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The recipe's `sweep` section."""

    self_trained: str | None = None
    """Snapshots to try: a glob pattern or a run directory (default: finetune.out)."""
    w: str | list[float] = "0:2:0.25"
    """Extrapolation weights: 'start:stop:step' (stop included), 'a,b,c', or a list."""
    cfg: list[float] | None = None
    """Guidance scales to try jointly with w (families whose sampler has a `cfg` field)."""
    search: str = "grid"
    """Which grid points are scored: grid (all), brent (a line search over w per snapshot and cfg) or
    coordinate (a search of (w, cfg) per snapshot); see neon.search."""
    num: int = 1000
    """Samples per evaluation while selecting."""
    screen_num: int | None = None
    """Successive halving: the search runs at this many samples (the first screen_num selection
    seeds) and the best `screen_keep` fraction of its points is scored again at num. Default:
    num // 4 for brent and coordinate, num for grid (no screening)."""
    screen_keep: float = 0.25
    """Successive halving: the fraction of the screened points (at least 2) scored again at num."""
    final_num: int = 0
    """Samples per seed range of the final report of the chosen point and the base (0: no final report)."""
    final_seeds: int = 3
    """Disjoint seed ranges of the final report (mean ± sd and min over them)."""
    seed_base: int = 1_000_000
    """First seed of the selection range."""
    final_seed_base: int = 2_000_000
    """First seed of the final ranges (disjoint from the selection range)."""
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
    metrics: list[str] = dataclasses.field(default_factory=lambda: ["fid"])
    """Final report metrics (`neon.metrics.score.METRICS`); fd_dinov2, prdc: against precision_recall's."""
    refine: float | None = None
    """The authors' ±refine stage around the best point at n = num (`neon.search`); None: none."""
    base_cfg: float | None = None
    """The base's cfg in the final report (a published one); default: its best on the selection."""

    def __post_init__(self):
        if self.num < 2 or self.final_num < 0 or self.batch_size <= 0:
            raise NeonError("sweep.num must be >= 2, sweep.final_num >= 0 and sweep.batch_size > 0")
        if self.search not in search.STRATEGIES:
            raise NeonError(
                f"sweep.search must be one of {', '.join(search.STRATEGIES)}, got {self.search!r}"
            )
        if self.screen_num is not None and not 2 <= self.screen_num <= self.num:
            raise NeonError(f"sweep.screen_num must be in [2, sweep.num = {self.num}], got {self.screen_num}")
        if not 0 < self.screen_keep <= 1:
            raise NeonError(f"sweep.screen_keep must be in (0, 1], got {self.screen_keep}")
        if self.final_seeds < 1:
            raise NeonError(f"sweep.final_seeds must be >= 1, got {self.final_seeds}")
        end = self.final_seed_base + self.final_seeds * self.final_num
        if self.final_num and not (
            self.final_seed_base >= self.seed_base + self.num or end <= self.seed_base
        ):
            raise NeonError(
                f"sweep: the final seed ranges [{self.final_seed_base}, {end}) overlap the selection "
                f"seed range [{self.seed_base}, {self.seed_base + self.num})"
            )
        if (self.inception_score or self.precision_recall) and not self.final_num:
            raise NeonError("sweep.inception_score and sweep.precision_recall score the final report: "
                            "set sweep.final_num")
        if self.inception_score and self.final_num < fid.IS_SPLITS:
            raise NeonError(f"sweep.inception_score needs sweep.final_num >= {fid.IS_SPLITS}")
        if self.precision_recall and self.final_num <= fid.PR_NEIGHBOURS:
            raise NeonError(f"sweep.precision_recall needs sweep.final_num > {fid.PR_NEIGHBOURS}")
        score.check_metrics(self.metrics, self.precision_recall, "sweep.metrics", "sweep.precision_recall")
        if self.refine is not None and not 0 < self.refine:
            raise NeonError(f"sweep.refine must be > 0, got {self.refine}")
        if max(self.num, self.final_num) > synthetic.MAX_NUM:  # before any allocation of that size
            raise NeonError(f"sweep.num and sweep.final_num must be at most {synthetic.MAX_NUM:,}")
        search.grid(self.w)

    def extras(self) -> set[str]:
        """The final report's metrics besides fid, as `neon.metrics.score.generate_and_score` names them."""
        return set(self.metrics) - {"fid"} | ({"prdc"} if self.precision_recall else set())

    def screen(self) -> int:
        """Samples per evaluation of the search's first round (num: no screening)."""
        if self.screen_num is not None:
            return self.screen_num
        return self.num if self.search == "grid" else max(2, self.num // 4)

    def final_ranges(self) -> list[tuple[int, int]]:
        """The final report's seed ranges, as (first seed, number of samples)."""
        return [(self.final_seed_base + i * self.final_num, self.final_num) for i in range(self.final_seeds)]

    def overrides(self) -> dict:
        """The sampler overrides every evaluation applies besides its cfg (a swept cfg replaces a
        `cfg` here), as recorded in results.jsonl: part of each result's key."""
        return files.finite_json(
            {k: v for k, v in sorted(self.sampler.items()) if not (k == "cfg" and self.cfg)}
        )


def run(family, model, base_path: str, sampler, conf: SweepConfig,
        fid_conf: inception.FidConfig = inception.FidConfig(), extra=None) -> Iterator[Progress]:
    """Collective: the search (`conf.search`), then the final report. Yields progress in evaluations
    (the total is None: a search decides as it goes), each new result record (as written to
    results.jsonl) as a record's `info`; records already in the file are reused, not yielded. The last
    record's `result` is the `Summary`. `extra` is `neon.evaluate.Metrics.extra` (an experiment's own
    metrics): its keys join every record, and the final report summarizes and pairs them too."""
    paths = snapshot_paths(conf)
    out = output_dir(conf)
    metrics = evaluate.Metrics(score.reference(family, conf.ref), fid_conf, extra=extra)
    if (conf.cfg or conf.base_cfg is not None) and "cfg" not in {f.name for f in dataclasses.fields(sampler)}:
        raise NeonError(f"sweep.cfg, sweep.base_cfg: the {family.name} sampler has no guidance scale `cfg`")
    thetas = _Thetas(family, base_path)
    for path in paths:  # every snapshot it may use, before the first evaluation is scored or written
        merge.check_self_trained(thetas.base, thetas.of(path), path)
    cache = {record_key(r): r for r in load_results(out)}
    start_cfg = conf.sampler.get("cfg", getattr(sampler, "cfg", None))  # the evaluation sampler's own
    steps = search.search(
        conf.search,
        paths,
        search.grid(conf.w),
        conf.cfg or [None],
        conf.num,
        conf.screen(),
        conf.screen_keep,
        start_cfg,
        conf.refine,
    )
    value, done = None, 0
    yield Progress(done, None, "eval")
    while True:
        try:
            snapshot, w, c, n = steps.send(value)
        except StopIteration:
            break
        key = record_key(record_point(conf, snapshot, w, c, (conf.seed_base, n)))
        if key not in cache:
            cache[key] = _evaluate(family, model, thetas, snapshot, w, c, (conf.seed_base, n), sampler, conf,
                                   metrics, out)
            done += 1
            yield Progress(done, None, "eval", info=cache[key])
        value = cache[key]["fid"]
    if conf.final_num:
        records = load_results(out)
        best = best_point(records, conf, paths)
        sides = [(BASE, 0.0, base_cfg(records, conf, paths)), (best["snapshot"], best["w"], best["cfg"])]
        asked = _asked(conf)
        # a final point lacking an asked metric is redone
        finished = {record_key(r) for r in records if asked <= set(r)}
        final_metrics = None  # real features are read once, and only when a final point needs them
        for seeds in conf.final_ranges():
            for snapshot, w, c in sides[:1] if sides[0] == sides[1] else sides:
                if record_key(record_point(conf, snapshot, w, c, seeds)) not in finished:
                    if final_metrics is None:
                        real = (score.real_features(conf.precision_recall, fid_conf, conf.extras())
                                if conf.precision_recall else None)
                        final_metrics = dataclasses.replace(
                            metrics,
                            inception_score=conf.inception_score,
                            real=real,
                            extras=frozenset(conf.extras()),
                        )
                    record = _evaluate(family, model, thetas, snapshot, w, c, seeds, sampler, conf,
                                       final_metrics, out)
                    done += 1
                    yield Progress(done, None, "eval", info=record)
    merge.extrapolate_into(model.net, thetas.base, None, 0.0)
    yield Progress(done, done, "eval", result=neon_summary.summary(load_results(out), conf, paths))


class _Thetas:
    """θ of the base and of the snapshot in use, for `evaluate.evaluate`: each file read once, memory-mapped
    where its format allows (`.pt`), so the ranks of a node share its pages and a process holds no copy of
    its own; θ_neon is built in the network's memory on its device (`merge.extrapolate_into`)."""

    def __init__(self, family, base_path: str):
        self.family = family
        # (.pt only: others are read)
        self.base = neon_family.read_checkpoint(family, base_path, mmap=True).weights
        self.path, self.weights = None, None

    def of(self, snapshot: str):
        if snapshot == BASE:
            return None
        if snapshot != self.path:
            self.path, self.weights = None, None  # drop the last mapping before the next one is made
            self.path, self.weights = (
                snapshot,
                neon_family.read_checkpoint(self.family, snapshot, mmap=True).weights,
            )
        return self.weights


def snapshot_paths(conf: SweepConfig) -> list[str]:
    """The snapshots `conf.self_trained` names, in order of images seen; NeonError when none match."""
    paths = finetune.snapshots(conf.self_trained) if conf.self_trained else []
    if not paths:
        raise NeonError(f"no snapshots match sweep.self_trained {conf.self_trained!r}")
    return paths


def output_dir(conf: SweepConfig) -> str:
    if conf.out:
        return conf.out
    paths = finetune.snapshots(conf.self_trained or "")
    return os.path.join(os.path.dirname(paths[0]) if paths else ".", "sweep")


def load_results(out: str) -> list[dict]:
    """The records of `out/results.jsonl` (empty when there is none)."""
    return files.read_jsonl(os.path.join(out, RESULTS))


def best_point(records: list[dict], conf: SweepConfig, paths: list[str] | None = None) -> dict:
    """The selection record at n = num with the lowest FID among this sweep's grid."""
    chosen = [r for r in selection(records, conf, paths) if r["num"] == conf.num]
    if not chosen:
        raise NeonError("the sweep has no results yet")
    return min(chosen, key=record_fid)


def base_cfg(records: list[dict], conf: SweepConfig, paths: list[str] | None = None):
    """The base's cfg in the final report: `conf.base_cfg` when pinned, else the cfg of the lowest w = 0
    selection record at n = num (the chosen point's cfg when there is none)."""
    if conf.base_cfg is not None:
        return conf.base_cfg
    line = [r for r in selection(records, conf, paths) if r["snapshot"] == BASE and r["num"] == conf.num]
    return min(line, key=record_fid)["cfg"] if line else best_point(records, conf, paths)["cfg"]


def curve(records: list[dict], conf: SweepConfig, snapshot: str, cfg_value=None,
          n: int | None = None) -> tuple[list[float], list[float]]:
    """(w, fid) of one snapshot's selection results at n samples (default num), sorted by w, the base
    at w = 0 included."""
    n = conf.num if n is None else n
    points = {r["w"]: r["fid"] for r in selection(records, conf) if r["num"] == n
              and r["cfg"] == cfg_value and r["snapshot"] in (snapshot, BASE)}
    ws = sorted(points)
    return ws, [points[w] for w in ws]


def selection(records: list[dict], conf: SweepConfig, paths: list[str] | None = None) -> list[dict]:
    """This sweep's selection records, at any n: the grid's points (and their refinement neighbours) on
    the selection seeds with this sweep's sampler overrides; the latest of each key."""
    paths = set(paths if paths is not None else finetune.snapshots(conf.self_trained or ""))
    ws = set(search.refined(search.grid(conf.w), conf.refine)) | {0.0}
    cfgs, overrides = set(search.refined(conf.cfg or [None], conf.refine)), _sampler_key(conf.overrides())
    latest = {record_key(r): r for r in records
              if r["seeds"][0] == conf.seed_base and _sampler_key(r.get("sampler")) == overrides
              and r["w"] in ws and r["cfg"] in cfgs and (r["snapshot"] == BASE or r["snapshot"] in paths)}
    return list(latest.values())


def _evaluate(family, model, thetas: _Thetas, snapshot, w, c, seeds, sampler, conf: SweepConfig,
              metrics: evaluate.Metrics, out: str) -> dict:
    """Score one point through `neon.evaluate.evaluate` and append its record to results.jsonl (rank 0)."""
    started = time.time()
    fields = dict(conf.sampler)
    if c is not None:
        fields["cfg"] = c
    scores = evaluate.evaluate(family, model, thetas.base, dataclasses.replace(sampler, **fields), seeds,
                               conf.batch_size, metrics, self_trained=thetas.of(snapshot), w=w)
    record = files.finite_json({**record_point(conf, snapshot, w, c, seeds), **scores,
                                "seconds": round(time.time() - started, 3)})
    if metrics.real is not None:
        record["real"] = conf.precision_recall
    error = None
    if distributed.is_main():
        try:
            os.makedirs(out, exist_ok=True)
            files.append_jsonl(os.path.join(out, RESULTS), record)
        except OSError as e:  # a full disk: raised on every rank by stop.agree
            error = e
    signum = stop.agree(error)  # the barrier too: a signal caught by any rank stops all after this point
    if signum is not None:
        raise stop.Stopped(f"the sweep stopped after scoring {snapshot} w={w:g} cfg={c} "
                           f"(results in {os.path.join(out, RESULTS)})", signum)
    return record


def record_point(conf: SweepConfig, snapshot: str, w: float, c, seeds: tuple[int, int]) -> dict:
    """The key fields of a record."""
    return {
        "snapshot": snapshot,
        "w": w,
        "cfg": c,
        "num": seeds[1],
        "seeds": list(seeds),
        "sampler": conf.overrides(),
    }


def _asked(conf: SweepConfig) -> set[str]:
    """The metric keys a final record must hold."""
    extras = conf.extras()
    return (
        ({"is"} if conf.inception_score else set())
        | ({"precision"} if conf.precision_recall else set())
        | ({"fd_dinov2"} if "fd_dinov2" in extras else set())
        | ({"density"} if "prdc" in extras else set())
    )


def record_key(record: dict) -> tuple:
    """A record's identity: records written before the sampler overrides were recorded have none."""
    return (record["snapshot"], float(record["w"]), record["cfg"], tuple(record["seeds"]),
            _sampler_key(record.get("sampler")))


def _sampler_key(overrides: dict | None) -> str:
    return json.dumps(overrides or {}, sort_keys=True)


def record_fid(record: dict) -> float:
    return math.inf if record.get("fid") is None else record["fid"]
