"""The one path from θ_neon(w) to a score, and what a set of scores over seed ranges says.

`evaluate` takes a family, a loaded model, θ_base, a self-trained θ_s with its weight w (θ_neon =
(1 + w) θ_base − w θ_s, Neon paper Algorithm 1; w = 0 or no θ_s: the base) or a control θ used as it
is, a sampler, a seed range and the metrics to compute (`Metrics`), loads that θ into the model's
network on its own device (`neon.merge.extrapolate_into`), draws the samples of the seed range and
scores them through `neon.metrics.score`. It returns the scores and, when asked, the samples and their
features. The sweep, `neon report`'s pictures and the experiments built on the core (the
demos of `neon.demos`) all call it, so θ_neon is built and scored in one place.

`summarize` (mean, sd, min over seed ranges) and `paired` (differences range by range, their mean, sd
and 95% t-interval, and how many ranges improved) are the statistics of the sweep's final report and of
every experiment's report: two models scored on the same seed ranges are compared range by range, so
the ranges' own difficulty cancels.
"""

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping

import torch
from scipy import stats as scipy_stats

from neon import merge, synthetic
from neon.metrics import inception, score

Theta = Mapping[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Metrics:
    """What an evaluation measures. FID always (against `ref_stats`, on the family's features: its own
    `features` where it has them, else Inception's pool features)."""

    ref_stats: tuple
    """(mu, sigma) of the reference."""
    fid: inception.FidConfig = inception.FidConfig()
    """The Inception extractor's settings (weights, batch size)."""
    inception_score: bool = False
    """Also the Inception score (image families; every feature is then Inception's)."""
    real: dict | None = None
    """{'pool': features [M, 2048][, 'dinov2']} of real images (`neon.metrics.score.real_features`):
    also precision/recall (k = 5) against them."""
    extras: frozenset = frozenset()
    """With `real`: 'prdc' adds density/coverage, 'fd_dinov2' FD-DINOv2 (`neon.metrics.score.METRICS`)."""
    extra: Callable[[torch.Tensor, torch.Tensor], dict] | None = None
    """`extra(features, labels) -> {name: float}`: more metrics from the features FID was computed on
    and the labels the samples were drawn with (an experiment's own, e.g. label accuracy)."""


def evaluate(
    family,
    model,
    base: Theta,
    sampler,
    seeds: tuple[int, int],
    batch_size: int,
    metrics: Metrics | None,
    *,
    self_trained: Theta | None = None,
    w: float = 0.0,
    control: Theta | None = None,
    keep_samples: bool = False,
    keep_features: bool = False,
) -> dict:
    """Collective: the scores of one θ on the seed range `seeds` = (first seed, number of samples).

    θ is `control` when given, else θ_neon(w) from `base` and `self_trained` (the base when w = 0 or
    `self_trained` is None); it is written into `model.net` (which keeps it afterwards). Labels are
    balanced over the classes and shuffled by the first seed, as a synthetic set's. Returns {'fid'
    (None when a sample was not finite, with 'nonfinite': True), and 'is', 'is_std', 'precision',
    'recall' and `metrics.extra`'s keys as asked}, plus 'samples' (uint8 or float, CPU, in seed
    order) and 'features' (float64 [N, D]) when asked; the same on every rank. With `metrics` None
    nothing is scored: {'samples'} only (not collective: for pictures, on one process)."""
    merge.extrapolate_into(model.net, control if control is not None else base,
                           None if control is not None else self_trained, w)
    if metrics is None:
        labels = synthetic.balanced_labels(seeds[1], model.num_classes, seeds[0])
        return {"samples": torch.cat([synthetic.draw(family, model, sampler, idx, labels, seeds[0])
                                      for idx in synthetic.batches(0, seeds[1], batch_size)])}
    keep = keep_features or metrics.extra is not None
    result = score.generate_and_score(
        family,
        model,
        sampler,
        seeds,
        batch_size,
        metrics.fid,
        metrics.ref_stats,
        metrics.inception_score,
        metrics.real,
        keep_samples=keep_samples,
        keep_features=keep,
        extras=metrics.extras,
    )
    if metrics.extra is not None and result["fid"] is not None:
        labels = synthetic.balanced_labels(seeds[1], model.num_classes, seeds[0])
        result.update(metrics.extra(result["features"], labels))
    if not keep_features:
        result.pop("features", None)
    return result


@dataclasses.dataclass(frozen=True)
class Stats:
    """One metric over k seed ranges."""

    values: list[float]
    mean: float | None
    sd: float | None
    """The sample sd; None for fewer than two values."""
    min: float | None


def summarize(values: list[float]) -> Stats:
    """mean, sd (None for fewer than two values) and min of `values` (all None when empty)."""
    values = [float(v) for v in values]
    if not values:
        return Stats([], None, None, None)
    return Stats(values, statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None,
                 min(values))


@dataclasses.dataclass(frozen=True)
class Paired:
    """Differences a − b of two models scored on the same k seed ranges, range by range."""

    differences: list[float]
    mean: float
    sd: float | None
    low: float | None
    """The 95% t-interval of the mean difference (None for fewer than two ranges)."""
    high: float | None
    improved: int
    """Ranges on which a scored lower than b (for FID: a was better)."""


def paired(a: list[float], b: list[float], confidence: float = 0.95) -> Paired:
    """The paired comparison of `a` and `b` (same length, same seed ranges in the same order)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired needs two equally long, non-empty lists, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return Paired(d, mean, None, None, None, sum(x < 0 for x in d))
    sd = statistics.stdev(d)
    half = scipy_stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * sd / math.sqrt(len(d))
    return Paired(d, mean, sd, mean - half, mean + half, sum(x < 0 for x in d))


def verdict(comparison: Paired) -> str:
    """What a paired FID comparison says: 'better' ('worse') when the 95% interval of the mean difference
    lies below (above) 0, else 'within the seed spread' (also with one range: no interval)."""
    if comparison.low is not None and comparison.high < 0:
        return "better"
    if comparison.low is not None and comparison.low > 0:
        return "worse"
    return "within the seed spread"
