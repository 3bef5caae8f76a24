"""Choosing w: evaluate θ_neon = (1 + w) θ_base − w θ_self_trained over the grid of (snapshot, w, cfg).

The grid is every snapshot × the w values × the cfg values (w = 0 is the base, scored once per cfg).
`sweep.search` says which of its points are scored (`neon.search`): all of them (`grid`, the
default), or those a line search over w (`brent`) or a search of (w, cfg) (`coordinate`) asks for,
with successive halving: the search runs at n = `screen_num` samples and the best `screen_keep`
fraction of what it scored is scored again at n = `num`. The chosen point is the lowest FID at
n = num among the grid's points in results.jsonl.

Every evaluation of n samples uses the seeds [seed_base, seed_base + n): the same seeds for every
point, so differences between points are not sampling noise. Each point is scored by
`neon.evaluate.evaluate` (the project's one path from θ_neon(w) to a score) by the Fréchet distance
between the samples' features and reference statistics. θ of the base and of every snapshot is read with
`neon.family.read_checkpoint`, as `neon merge` reads it. Each evaluation is one line of
`results.jsonl` (snapshot, w, cfg, num, seeds, the sampler overrides `sampler`, the metrics, wall
time; a metric that is not finite is written as null). A line already there, with the same key
(snapshot, w, cfg, seeds, sampler overrides), is not computed again, so an interrupted sweep or
search resumes, and a grid after a search reuses its points.

The final report scores the chosen point and the base on `final_seeds` disjoint seed ranges of
`final_num` samples, [final_seed_base + i·final_num, final_seed_base + (i + 1)·final_num), where
asked with the Inception score and precision/recall as well (image families: those points take all
their features from Inception). The `Summary` gives mean, sd and min of each metric over the ranges
(`neon.evaluate.summarize`), the paired comparison range by range (`neon.evaluate.paired`: mean
difference, sd, 95% interval, ranges improved) and its verdict, and whether the gain (the base's mean
FID − the chosen point's) exceeds the spread (the larger of the two FID sds).

Merged weights are built in the network's own memory on its device (no files); `neon merge` writes the
chosen one to disk.
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
from neon.errors import NeonError
from neon.io import checkpoint, files
from neon.metrics import fid, inception, score
from neon.progress import Progress

logger = logging.getLogger(__name__)

RESULTS = "results.jsonl"
BASE = search.BASE  # the `snapshot` of w = 0 evaluations: they do not depend on the snapshot
METRICS = ("fid", "is", "is_std", "precision", "recall")
EVIDENCE = 10  # the summary lists the best this many points of each n


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

    def __post_init__(self):
        if self.num < 2 or self.final_num < 0 or self.batch_size <= 0:
            raise NeonError("sweep.num must be >= 2, sweep.final_num >= 0 and sweep.batch_size > 0")
        if self.search not in search.STRATEGIES:
            raise NeonError(f"sweep.search must be one of {', '.join(search.STRATEGIES)}, got {self.search!r}")
        if self.screen_num is not None and not 2 <= self.screen_num <= self.num:
            raise NeonError(f"sweep.screen_num must be in [2, sweep.num = {self.num}], got {self.screen_num}")
        if not 0 < self.screen_keep <= 1:
            raise NeonError(f"sweep.screen_keep must be in (0, 1], got {self.screen_keep}")
        if self.final_seeds < 1:
            raise NeonError(f"sweep.final_seeds must be >= 1, got {self.final_seeds}")
        end = self.final_seed_base + self.final_seeds * self.final_num
        if self.final_num and not (self.final_seed_base >= self.seed_base + self.num or end <= self.seed_base):
            raise NeonError(f"sweep: the final seed ranges [{self.final_seed_base}, {end}) overlap the selection "
                            f"seed range [{self.seed_base}, {self.seed_base + self.num})")
        if (self.inception_score or self.precision_recall) and not self.final_num:
            raise NeonError("sweep.inception_score and sweep.precision_recall score the final report: "
                            "set sweep.final_num")
        if self.inception_score and self.final_num < fid.IS_SPLITS:
            raise NeonError(f"sweep.inception_score needs sweep.final_num >= {fid.IS_SPLITS}")
        if self.precision_recall and self.final_num <= fid.PR_NEIGHBOURS:
            raise NeonError(f"sweep.precision_recall needs sweep.final_num > {fid.PR_NEIGHBOURS}")
        if max(self.num, self.final_num) > synthetic.MAX_NUM:  # before any allocation of that size
            raise NeonError(f"sweep.num and sweep.final_num must be at most {synthetic.MAX_NUM:,}")
        search.grid(self.w)

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
        return files.finite_json({k: v for k, v in sorted(self.sampler.items()) if not (k == "cfg" and self.cfg)})


def run(family, model, base_path: str, sampler, conf: SweepConfig,
        fid_conf: inception.FidConfig = inception.FidConfig()) -> Iterator[Progress]:
    """Collective: the search (`conf.search`), then the final report. Yields progress in evaluations
    (the total is None: a search decides as it goes), each new result record (as written to
    results.jsonl) as a record's `info`; records already in the file are reused, not yielded. The last
    record's `result` is the `Summary`."""
    paths = snapshot_paths(conf)
    out = output_dir(conf)
    metrics = evaluate.Metrics(score.reference(family, conf.ref), fid_conf)
    if conf.cfg and "cfg" not in {f.name for f in dataclasses.fields(sampler)}:
        raise NeonError(f"sweep.cfg: the {family.name} sampler has no guidance scale `cfg`")
    thetas = _Thetas(family, base_path)
    for path in paths:  # every snapshot it may use, before the first evaluation is scored or written
        merge.check_self_trained(thetas.base, thetas.of(path), path)
    cache = {_key(r): r for r in load_results(out)}
    start_cfg = conf.sampler.get("cfg", getattr(sampler, "cfg", None))  # the evaluation sampler's own
    steps = search.search(conf.search, paths, search.grid(conf.w), conf.cfg or [None], conf.num, conf.screen(),
                          conf.screen_keep, start_cfg)
    value, done = None, 0
    yield Progress(done, None, "eval")
    while True:
        try:
            snapshot, w, c, n = steps.send(value)
        except StopIteration:
            break
        key = _key(_point(conf, snapshot, w, c, (conf.seed_base, n)))
        if key not in cache:
            cache[key] = _evaluate(family, model, thetas, snapshot, w, c, (conf.seed_base, n), sampler, conf,
                                   metrics, out)
            done += 1
            yield Progress(done, None, "eval", info=cache[key])
        value = cache[key]["fid"]
    if conf.final_num:
        records = load_results(out)
        best = best_point(records, conf, paths)
        asked = _asked(conf)
        finished = {_key(r) for r in records if asked <= set(r)}  # a final point lacking an asked metric is redone
        final_metrics = None  # real features are read once, and only when a final point needs them
        for seeds in conf.final_ranges():
            for snapshot, w in sorted({(BASE, 0.0), (best["snapshot"], best["w"])}):
                if _key(_point(conf, snapshot, w, best["cfg"], seeds)) not in finished:
                    if final_metrics is None:
                        real = score.real_features(conf.precision_recall, fid_conf) if conf.precision_recall else None
                        final_metrics = dataclasses.replace(metrics, inception_score=conf.inception_score, real=real)
                    record = _evaluate(family, model, thetas, snapshot, w, best["cfg"], seeds, sampler, conf,
                                       final_metrics, out)
                    done += 1
                    yield Progress(done, None, "eval", info=record)
    merge.extrapolate_into(model.net, thetas.base, None, 0.0)
    yield Progress(done, done, "eval", result=summary(load_results(out), conf, paths))


@dataclasses.dataclass(frozen=True)
class FinalReport:
    """The final report: the base and the chosen point on the same k disjoint seed ranges."""

    seeds: list[list[int]]
    """[first seed, samples] per range."""
    base: dict[str, evaluate.Stats]
    """Per metric (fid, and is, is_std, precision, recall where scored), over the ranges."""
    neon: dict[str, evaluate.Stats]
    paired: dict[str, evaluate.Paired | None]
    """Per metric, neon − base range by range (None until both sides have every range)."""
    images: int
    """Images the final report generated."""
    gain: float | None
    """The base's mean FID − the chosen point's (None until every range is scored)."""
    spread: float | None
    """The larger of the two FID sds (None with one range)."""
    gain_exceeds_spread: bool | None
    verdict: str | None
    """From the paired 95% interval of the FID differences (`neon.evaluate.verdict`)."""


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a sweep found: the chosen point, the evidence, the selection's cost and the final report."""

    search: str
    snapshot: str
    """The chosen snapshot (`BASE` when no snapshot beat the base)."""
    w: float
    cfg: float | None
    fid: float
    """The chosen point's FID at n = num on the selection seeds."""
    num: int
    evidence: list[dict]
    """Per n: how many points were scored and the best EVIDENCE of them as [snapshot, w, cfg, fid]."""
    selection_images: int
    final: FinalReport | None
    results: str
    """The path of results.jsonl."""

    def to_dict(self) -> dict:
        """The summary as JSON-able data (what `neon sweep` prints)."""
        return files.finite_json(dataclasses.asdict(self))


def summary(records: list[dict], conf: SweepConfig, paths: list[str] | None = None) -> Summary:
    """The sweep's `Summary` from its results: the chosen point (the lowest FID at n = num), the
    evidence, the images the selection generated and, with a final report, its statistics."""
    best = best_point(records, conf, paths)
    scored = selection(records, conf, paths)
    evidence = [{"n": n, "points": sum(r["num"] == n for r in scored),
                 "best": [[r["snapshot"], r["w"], r["cfg"], r["fid"]]
                          for r in sorted((r for r in scored if r["num"] == n), key=_fid)[:EVIDENCE]]}
                for n in sorted({r["num"] for r in scored})]
    return Summary(search=conf.search, snapshot=best["snapshot"], w=best["w"], cfg=best["cfg"], fid=best["fid"],
                   num=conf.num, evidence=evidence, selection_images=sum(r["num"] for r in scored),
                   final=_final(records, conf, best) if conf.final_num else None,
                   results=os.path.join(output_dir(conf), RESULTS))


def _final(records: list[dict], conf: SweepConfig, best: dict) -> FinalReport:
    """The final report's statistics (`FinalReport`)."""
    latest = {_key(r): r for r in records}
    sides, used = {}, {}
    for name, (snapshot, w) in (("base", (BASE, 0.0)), ("neon", (best["snapshot"], best["w"]))):
        keys = [_key(_point(conf, snapshot, w, best["cfg"], seeds)) for seeds in conf.final_ranges()]
        sides[name] = [latest.get(k) for k in keys]
        used.update((k, latest[k]["num"]) for k in keys if k in latest)
    stats, comparisons = {"base": {}, "neon": {}}, {}
    for metric in METRICS:
        values = {name: [r.get(metric) for r in rows if r is not None] for name, rows in sides.items()}
        if metric != "fid" and not any(v is not None for vs in values.values() for v in vs):
            continue
        for name in stats:
            stats[name][metric] = evaluate.summarize([v for v in values[name] if v is not None])
        complete = all(r is not None and r.get(metric) is not None for rows in sides.values() for r in rows)
        comparisons[metric] = (evaluate.paired([r[metric] for r in sides["neon"]], [r[metric] for r in sides["base"]])
                               if complete else None)
    fid_pair = comparisons["fid"]
    gain = -fid_pair.mean if fid_pair is not None else None
    spread = (max(stats["base"]["fid"].sd, stats["neon"]["fid"].sd)
              if fid_pair is not None and conf.final_seeds > 1 else None)
    return FinalReport(seeds=[list(seeds) for seeds in conf.final_ranges()], base=stats["base"], neon=stats["neon"],
                       paired=comparisons, images=sum(used.values()), gain=gain, spread=spread,
                       gain_exceeds_spread=None if spread is None else bool(gain > spread),
                       verdict=evaluate.verdict(fid_pair) if fid_pair is not None else None)


class _Thetas:
    """θ of the base (read once) and of the snapshot in use (memory-mapped where the file allows it, so the
    ranks of a node share its pages), for `evaluate.evaluate`."""

    def __init__(self, family, base_path: str):
        self.family = family
        self.base = neon_family.read_checkpoint(family, base_path).weights
        self.path, self.weights = None, None

    def of(self, snapshot: str):
        if snapshot == BASE:
            return None
        if snapshot != self.path:
            self.path, self.weights = None, None  # drop the last mapping before the next one is made
            mmap = checkpoint.format_of(snapshot) == "pt"
            self.path, self.weights = snapshot, neon_family.read_checkpoint(self.family, snapshot, mmap=mmap).weights
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
    return min(chosen, key=_fid)


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
    """This sweep's selection records, at any n: the grid's points on the selection seeds with this
    sweep's sampler overrides; the latest of each key."""
    paths = set(paths if paths is not None else finetune.snapshots(conf.self_trained or ""))
    ws, cfgs, overrides = set(search.grid(conf.w)) | {0.0}, set(conf.cfg or [None]), _sampler_key(conf.overrides())
    latest = {_key(r): r for r in records
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
    record = files.finite_json({**_point(conf, snapshot, w, c, seeds), **scores,
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


def _point(conf: SweepConfig, snapshot: str, w: float, c, seeds: tuple[int, int]) -> dict:
    """The key fields of a record."""
    return {"snapshot": snapshot, "w": w, "cfg": c, "num": seeds[1], "seeds": list(seeds), "sampler": conf.overrides()}


def _asked(conf: SweepConfig) -> set[str]:
    """The metric keys a final record must hold."""
    return ({"is"} if conf.inception_score else set()) | ({"precision"} if conf.precision_recall else set())


def _key(record: dict) -> tuple:
    """A record's identity: records written before the sampler overrides were recorded have none."""
    return (record["snapshot"], float(record["w"]), record["cfg"], tuple(record["seeds"]),
            _sampler_key(record.get("sampler")))


def _sampler_key(overrides: dict | None) -> str:
    return json.dumps(overrides or {}, sort_keys=True)


def _fid(record: dict) -> float:
    return math.inf if record.get("fid") is None else record["fid"]
