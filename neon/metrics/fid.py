"""The paper's metrics on Inception features: FID, Inception score and precision/recall.

Statistics are float64 mean and unbiased covariance (as torch-fidelity and the ADM/EDM reference
files use). The metrics themselves are torch-fidelity's functions, not copies of them:
`fid_statistics_to_metric`, `isc_features_to_metric` (10 splits) and `prc_features_to_metric`
(k = 5 nearest neighbours, on the same 2048-d Inception features as FID, as the paper reports).

`reference_statistics` and `evaluate` are the collective drivers behind `neon fid-stats` and
`neon fid`: every rank extracts the features of its share of the images (`inception.extract`),
the features are gathered in order, and every rank computes the same numbers from them.
"""

import math
from typing import Iterator

import numpy as np
import torch

from neon import distributed
from neon.errors import NeonError
from neon.metrics import images as image_sources
from neon.metrics import inception, stats
from neon.metrics.inception import FidConfig
from neon.progress import Progress

IS_SPLITS = 10  # the Inception score is the mean (and std) over 10 splits (Salimans et al. 2016)
PR_NEIGHBOURS = 5  # precision/recall with k = 5 (Kynkäänniemi et al. 2019; ADM's evaluator)


def statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu float64 [D], sigma float64 [D, D]) of features [N, D], N >= 2; sigma is unbiased."""
    x = (
        features.detach().cpu().double().numpy()
        if isinstance(features, torch.Tensor)
        else np.asarray(features, np.float64)
    )
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(stats_a: tuple[np.ndarray, np.ndarray], stats_b: tuple[np.ndarray, np.ndarray]) -> float:
    """‖mu_a − mu_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) (Heusel et al. 2017, Eq. 6), by torch-fidelity.

    When Σ_a + Σ_b is singular (fewer than D + 1 images on both sides, as in tests and in
    self-checks), the trace is taken on its span: outside it both covariances are zero and add
    exactly nothing, but torch-fidelity's square roots of the rounding noise there (~1e-8 ‖Σ‖ per
    direction) add up to ~1e-3 over 2048 directions, and the FID of a set against its own
    statistics would not be 0. When either side is full rank (any 50k reference) the statistics go
    to torch-fidelity unchanged.

    It is a squared distance: rounding that takes it below 0 (−1e-12 for identical statistics on some
    CPUs' kernels) is returned as 0.
    """
    import scipy.linalg
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if len(stats_a[0]) != len(stats_b[0]):
        raise NeonError(f"the features have dimension {len(stats_a[0])} but the reference statistics "
                        f"{len(stats_b[0])}: a reference made with another feature network?")

    (mu_a, sigma_a), (mu_b, sigma_b) = [
        (np.asarray(mu, np.float64), np.atleast_2d(np.asarray(sigma, np.float64)))
        for mu, sigma in (stats_a, stats_b)
    ]
    both = sigma_a + sigma_b
    # At least numpy's matrix_rank threshold: eigenvalues below it are rounding noise of zero.
    tolerance = np.linalg.norm(both) * len(both) * np.finfo(np.float64).eps
    outside = 0.0
    try:
        np.linalg.cholesky(both - tolerance * np.eye(len(both)))  # succeeds iff every eigenvalue exceeds it
    except np.linalg.LinAlgError:
        _, span = scipy.linalg.eigh(both, subset_by_value=(tolerance, np.inf), driver="evr")
        diff = mu_a - mu_b
        outside = float(diff @ diff - np.sum((span.T @ diff) ** 2))  # the mean difference off the span
        if span.shape[1] == 0:
            return max(outside, 0.0)
        mu_a, mu_b = span.T @ mu_a, span.T @ mu_b
        sigma_a, sigma_b = span.T @ sigma_a @ span, span.T @ sigma_b @ span
    metric = fid_statistics_to_metric(
        {"mu": mu_a, "sigma": sigma_a}, {"mu": mu_b, "sigma": sigma_b}, verbose=False
    )
    return max(float(metric[KEY_METRIC_FID]) + outside, 0.0)


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS) -> tuple[float, float]:
    """(mean, std) of the Inception score over `splits` splits of unbiased logits [N, 1008], N >=
    splits. The images are shuffled with torch-fidelity's fixed seed, as it does."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    if len(logits) < splits:
        raise NeonError(
            f"the Inception score needs at least {splits} images ({splits} splits), got {len(logits)}"
        )
    out = isc_features_to_metric(logits.float().cpu(), splits=splits)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def precision_recall(
    features: torch.Tensor, real: torch.Tensor, k: int = PR_NEIGHBOURS
) -> tuple[float, float]:
    """(precision, recall) of generated features [N, D] against real features [M, D]: the share of
    generated samples inside the real manifold (k-NN balls) and of real samples inside the
    generated one. N and M must exceed k."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    if min(len(features), len(real)) <= k:
        raise NeonError(f"precision/recall with k = {k} needs more than {k} images in each set, "
                        f"got {len(features)} and {len(real)}")
    out = prc_features_to_metric(
        features.float().cpu(), real.float().cpu(), prc_neighborhood=k, verbose=False
    )
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]


def density_coverage(features: torch.Tensor, real: torch.Tensor, k: int = PR_NEIGHBOURS,
                     chunk: int = 4096) -> tuple[float, float]:
    """(density, coverage) of generated features [N, D] against real features [M, D] (Naeem et al.
    2020, Eq. 3 and 4): each real sample's radius is the distance to its k-th nearest other real
    sample; density = (1 / kN) Σ_j #{i : ‖f_j − r_i‖ < radius_i}, coverage = the share of real samples
    whose nearest generated sample lies within their radius. Euclidean distances in float64, `chunk`
    rows at a time (memory O(chunk · max(N, M))). N >= 1, M > k."""
    if len(real) <= k or not len(features):
        raise NeonError(f"density/coverage with k = {k} needs more than {k} real images and one generated, "
                        f"got {len(real)} and {len(features)}")
    fake, real = features.detach().cpu().double(), real.detach().cpu().double()
    # k + 1: the nearest "neighbour" of a real sample is itself, at distance 0
    radii = torch.cat([torch.cdist(part, real).kthvalue(k + 1, dim=1).values for part in real.split(chunk)])
    inside, nearest = 0, torch.full((len(real),), math.inf, dtype=torch.float64)
    for part in fake.split(chunk):
        d = torch.cdist(part, real)  # [chunk, M]
        inside += int((d < radii).sum())
        nearest = torch.minimum(nearest, d.min(dim=0).values)
    return inside / (k * len(fake)), float((nearest < radii).double().mean())


def reference_statistics(source: str, out: str, conf: FidConfig) -> Iterator[Progress]:
    """Collective: write the statistics of the pool features of image source `source` to `out`
    (`.npz` with mu, sigma; rank 0 writes). Yields progress in images; the last record's `result` is
    {'num': N}."""
    images = image_sources.source(source)
    if len(images) < 2:
        raise NeonError(f"{source}: statistics need at least 2 images, got {len(images)}")
    # the inputs first; a missing weights file fails every rank at once
    inception.weights_path(conf.inception_weights)
    features = {}
    yield from _features(images, conf, 0, len(images), features)
    if distributed.is_main():
        stats.save(out, *statistics(features["pool"]))
    distributed.barrier()
    yield Progress(len(images), len(images), "img", result={"num": len(images)})


def evaluate(source: str, ref: str, conf: FidConfig, with_is: bool = False,
             real: str | None = None, metrics=("fid",)) -> Iterator[Progress]:
    """Collective: FID of image source `source` against reference statistics `ref`; `with_is` adds
    its Inception score, `real` (an image source) its precision and recall against those images, and
    with `metrics` (`neon.metrics.score.METRICS`) 'prdc' their density and coverage, 'fd_dinov2' the
    Fréchet distance of the two sets' DINOv2 features. Yields progress in images (both sources); the
    last record's `result` is {'images', 'num', 'ref', 'fid'[, 'is', 'is_std'][, 'real', 'num_real',
    'precision', 'recall'][, 'density', 'coverage'][, 'fd_dinov2']}, the same on every rank."""
    images = image_sources.source(source)
    real_images = image_sources.source(real) if real is not None else None
    mu, sigma = stats.load(ref)
    if mu.shape != (2048,):
        raise NeonError(f"{ref} holds {mu.shape[0]}-d statistics; Inception pool features are 2048-d")
    if len(images) < 2:
        raise NeonError(f"{source}: FID needs at least 2 images, got {len(images)}")
    if with_is and len(images) < IS_SPLITS:
        raise NeonError(f"{source}: the Inception score needs at least {IS_SPLITS} images, got {len(images)}")
    if real_images is not None and min(len(images), len(real_images)) <= PR_NEIGHBOURS:
        raise NeonError(
            f"precision/recall with k = {PR_NEIGHBOURS} needs more than {PR_NEIGHBOURS} images in "
            f"each set, got {len(images)} and {len(real_images)}"
        )
    # the inputs first; a missing weights file fails every rank at once
    inception.weights_path(conf.inception_weights)
    total = len(images) + (len(real_images) if real_images is not None else 0)
    features, real_features = {}, {}
    yield from _features(images, conf, 0, total, features)
    result = {"images": source, "num": len(images), "ref": ref,
              "fid": frechet_distance(statistics(features["pool"]), (mu, sigma))}
    if with_is:
        result["is"], result["is_std"] = inception_score(features["logits"])
    if real_images is not None:
        yield from _features(real_images, conf, len(images), total, real_features)
        result["real"], result["num_real"] = real, len(real_images)
        result["precision"], result["recall"] = precision_recall(features["pool"], real_features["pool"])
        if "prdc" in metrics:
            result["density"], result["coverage"] = density_coverage(features["pool"], real_features["pool"])
        if "fd_dinov2" in metrics:
            from neon.metrics import dinov2

            sides = [
                next(r for r in dinov2.extract(x, conf.batch_size) if r.result is not None).result["dinov2"]
                for x in (images, real_images)
            ]
            result["fd_dinov2"] = frechet_distance(statistics(sides[0]), statistics(sides[1]))
    yield Progress(total, total, "img", result=result)


def features_of(images, conf: FidConfig) -> dict:
    """Collective: {'pool', 'logits'} of every image of `images`, without progress records."""
    features = {}
    for _ in _features(images, conf, 0, len(images), features):
        pass
    return features


def _features(images, conf: FidConfig, offset: int, total: int, into: dict) -> Iterator[Progress]:
    """Collective: the progress of `inception.extract` over `images` (counted from `offset` against
    `total`, the images of the whole computation); fills `into` with its features."""
    with distributed.main_first():  # rank 0 downloads the weights first when there is no local file
        extractor = inception.shared(conf)
    for record in inception.extract(extractor, images, conf.batch_size):
        if record.result is not None:
            into.update(record.result)
        else:
            yield Progress(offset + record.done, total, "img")
