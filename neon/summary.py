"""What a sweep found: the chosen point, the evidence, the selection's cost and the final report's
statistics, as typed objects (`Summary`, `FinalReport`) built from results.jsonl (`neon.sweep`).

The final report compares the base at its own cfg with Neon at its chosen (snapshot, w, cfg) on the same
k disjoint seed ranges: per metric the mean, sd and min over the ranges (`neon.evaluate.summarize`), and
the differences Neon − base range by range with their 95% t-interval (`neon.evaluate.paired`), whose
verdict (`neon.evaluate.verdict`) is the report's.
"""

import dataclasses
import os

from neon import evaluate, sweep
from neon.io import files

EVIDENCE = 10  # the summary lists the best this many points of each n


@dataclasses.dataclass(frozen=True)
class FinalReport:
    """The final report: the base and the chosen point on the same k disjoint seed ranges."""

    seeds: list[list[int]]  # [first seed, samples] per range.
    base_cfg: float | None  # The base's cfg: its own best on the selection, or sweep.base_cfg.
    cfg: float | None  # The cfg Neon was scored at (the chosen point's).
    # Per metric scored (fid, sweep.METRICS where asked, `extra`'s), over the ranges.
    base: dict[str, evaluate.Stats]
    neon: dict[str, evaluate.Stats]
    paired: dict[str, evaluate.Paired | None]
    """Per metric, neon − base range by range (None until both sides have every range)."""
    images: int  # Images the final report generated.
    gain: float | None  # The base's mean FID − the chosen point's (None until every range is scored).
    spread: float | None  # The larger of the two FID sds (None with one range).
    gain_exceeds_spread: bool | None
    verdict: str | None  # From the paired 95% interval of the FID differences (`neon.evaluate.verdict`).


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a sweep found: the chosen point, the evidence, the selection's cost and the final report."""

    search: str
    snapshot: str  # The chosen snapshot (`sweep.BASE` when no snapshot beat the base).
    w: float
    cfg: float | None
    base_cfg: float | None  # The base's cfg in the final report: sweep.base_cfg, else its best at n = num.
    fid: float  # The chosen point's FID at n = num on the selection seeds.
    num: int
    evidence: list[dict]
    """Per n: how many points were scored and the best EVIDENCE of them as [snapshot, w, cfg, fid]."""
    selection_images: int
    final: FinalReport | None
    results: str  # The path of results.jsonl.

    def to_dict(self) -> dict:
        """The summary as JSON-able data (what `neon sweep` prints)."""
        return files.finite_json(dataclasses.asdict(self))


def summary(records: list[dict], conf, paths: list[str] | None = None) -> Summary:
    """The sweep's `Summary` from its results: the chosen point (the lowest FID at n = num), the
    evidence, the images the selection generated and, with a final report, its statistics."""
    best = sweep.best_point(records, conf, paths)
    scored = sweep.selection(records, conf, paths)
    evidence = [
        {
            "n": n,
            "points": sum(r["num"] == n for r in scored),
            "best": [
                [r["snapshot"], r["w"], r["cfg"], r["fid"]]
                for r in sorted((r for r in scored if r["num"] == n), key=sweep.record_fid)[:EVIDENCE]
            ],
        }
        for n in sorted({r["num"] for r in scored})
    ]
    return Summary(
        search=conf.search,
        snapshot=best["snapshot"],
        w=best["w"],
        cfg=best["cfg"],
        base_cfg=sweep.base_cfg(records, conf, paths),
        fid=best["fid"],
        num=conf.num,
        evidence=evidence,
        selection_images=sum(r["num"] for r in scored),
        final=_final(records, conf, best, sweep.base_cfg(records, conf, paths)) if conf.final_num else None,
        results=os.path.join(sweep.output_dir(conf), sweep.RESULTS),
    )


def _final(records: list[dict], conf, best: dict, base_cfg_) -> FinalReport:
    """The final report's statistics (`FinalReport`): the base at `base_cfg_`, Neon at the chosen point."""
    latest = {sweep.record_key(r): r for r in records}
    sides, used = {}, {}
    for name, (snapshot, w, c) in (
        ("base", (sweep.BASE, 0.0, base_cfg_)),
        ("neon", (best["snapshot"], best["w"], best["cfg"])),
    ):
        keys = [
            sweep.record_key(sweep.record_point(conf, snapshot, w, c, seeds)) for seeds in conf.final_ranges()
        ]
        sides[name] = [latest.get(k) for k in keys]
        used.update((k, latest[k]["num"]) for k in keys if k in latest)
    stats, comparisons = {"base": {}, "neon": {}}, {}
    for metric in sweep.METRICS + _extra_metrics(r for rows in sides.values() for r in rows if r is not None):
        values = {name: [r.get(metric) for r in rows if r is not None] for name, rows in sides.items()}
        if metric != "fid" and not any(v is not None for vs in values.values() for v in vs):
            continue
        for name in stats:
            stats[name][metric] = evaluate.summarize([v for v in values[name] if v is not None])
        complete = all(r is not None and r.get(metric) is not None for rows in sides.values() for r in rows)
        comparisons[metric] = (
            evaluate.paired([r[metric] for r in sides["neon"]], [r[metric] for r in sides["base"]])
            if complete
            else None
        )
    fid_pair = comparisons["fid"]
    gain = -fid_pair.mean if fid_pair is not None else None
    spread = (max(stats["base"]["fid"].sd, stats["neon"]["fid"].sd)
              if fid_pair is not None and conf.final_seeds > 1 else None)
    return FinalReport(
        seeds=[list(seeds) for seeds in conf.final_ranges()],
        base_cfg=base_cfg_,
        cfg=best["cfg"],
        base=stats["base"],
        neon=stats["neon"],
        paired=comparisons,
        images=sum(used.values()),
        gain=gain,
        spread=spread,
        gain_exceeds_spread=None if spread is None else bool(gain > spread),
        verdict=evaluate.verdict(fid_pair) if fid_pair is not None else None,
    )



def _extra_metrics(records) -> tuple[str, ...]:
    """Numeric keys of `records` that are neither sweep.METRICS nor a record's own fields: the metrics an
    `extra` added (`neon.evaluate.Metrics.extra`), sorted."""
    fields = {"snapshot", "w", "cfg", "num", "seeds", "sampler", "seconds", "real", "nonfinite"}
    return tuple(
        sorted(
            {
                k
                for r in records
                for k, v in r.items()
                if k not in fields
                and k not in sweep.METRICS
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
            }
        )
    )
