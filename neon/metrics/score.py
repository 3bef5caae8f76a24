"""Generate-then-score: the one scoring path of the project (DESIGN.md "Scoring").

`generate_and_score` draws `num` samples of a model with seeds [start, start + num) (labels
balanced over the classes and shuffled by `start`, as a synthetic set's), sharded over the ranks in
fixed batches, and scores them against reference statistics: the sweep, `neon fid` on a model, and
every family's `calculate_fid.py` call it. Everything it needs is passed in: the family, the model,
the sampler, the seed range and an explicit `FidConfig`.

Features are the family's own where it defines `features` (the toy's points), else Inception's pool
features; the reference is `--ref` (a path or a URL) or the family's own `reference()`.
"""

import json

import torch

from neon import distributed, synthetic
from neon import family as neon_family
from neon.errors import NeonError, NonFiniteError
from neon.metrics import dinov2, fid, inception, stats
from neon.metrics import images as image_sources

METRICS = ("fid", "fd_dinov2", "prdc")
"""`--metrics`: fid (always); fd_dinov2, the Fréchet distance of DINOv2 ViT-L/14 features to those of
real images; prdc, precision, recall (torch-fidelity), density and coverage (`fid.density_coverage`)
of the Inception pool features against real images' (k = 5)."""


def parse_metrics(spec: str | list) -> list[str]:
    """'fid,fd_dinov2,prdc' (or a list) as a list of METRICS; NeonError on an unknown name."""
    names = [m.strip() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise NeonError(f"unknown metric {unknown[0]!r} (known: {', '.join(METRICS)})")
    return names


def check_metrics(metrics: list[str], real: str | None, where: str, real_where: str) -> None:
    """NeonError unless `metrics` are METRICS with fid among them, and a real image source `real` is
    given where fd_dinov2 or prdc needs one."""
    parse_metrics(metrics)
    if "fid" not in metrics:
        raise NeonError(f"{where} must include fid, got {','.join(metrics)}")
    if set(metrics) - {"fid"} and not real:
        raise NeonError(f"{where}: fd_dinov2 and prdc compare with real images: set {real_where}")


def features(family, samples: torch.Tensor, conf: inception.FidConfig) -> torch.Tensor:
    """float64 [B, D] features of a batch of samples: `family.features` where the family has it,
    else the Inception pool features of the uint8 images."""
    own = neon_family.member(family, "features")
    if own is not None:
        return own(samples)
    return inception.pool_and_logits(samples, conf)[0]


def reference(family, ref: str | None) -> tuple:
    """(mu, sigma): the statistics at `ref` (a path or a URL, fetched once), else the family's
    built-in reference; NeonError when neither exists."""
    if ref:
        return stats.fetch(ref)
    own = neon_family.member(family, "reference")
    built_in = own() if own is not None else None
    if built_in is None:
        raise NeonError("a reference is required (--ref): this family has no built-in reference statistics")
    return built_in


def generate_and_score(family, model, sampler, seeds: tuple[int, int], batch_size: int,
                       conf: inception.FidConfig, ref_stats, with_is: bool = False,
                       real: dict | None = None, keep_samples: bool = False,
                       keep_features: bool = False, extras: frozenset = frozenset()) -> dict:
    """Collective: {'fid'} of the samples with seeds [start, start + num) against `ref_stats`, the
    same on every rank. `with_is` adds 'is' and 'is_std'; `real` (pool features [M, 2048]) adds
    'precision' and 'recall'. With either, the samples must be uint8 images and every feature is
    Inception's (pool features for FID and precision/recall, logits for IS). `real` is {'pool'[, 'dinov2']}
    (`real_features`); `extras` (with `real`) adds 'fd_dinov2' ('fd_dinov2' in extras: DINOv2 features
    of the samples, `neon.metrics.dinov2`) and 'density', 'coverage' ('prdc'). A model whose samples
    are not finite (NaN or inf, on any rank) scores {'fid': None, 'nonfinite': True}. `keep_samples`
    and `keep_features` add 'samples' (CPU, seed order) and 'features' (those FID was computed on,
    float64 [num, D]), gathered from every rank. Callers evaluating θ_neon go through
    `neon.evaluate.evaluate`."""
    start, num = seeds
    labels = synthetic.balanced_labels(num, model.num_classes, start)
    inception_only = with_is or real is not None
    feats, nonfinite = [], False
    for idx in distributed.shard(synthetic.batches(0, num, batch_size)):
        try:
            samples = synthetic.draw(family, model, sampler, idx, labels, start)
        except NonFiniteError:
            nonfinite = True
            break
        if samples.is_floating_point() and not torch.isfinite(samples).all():
            nonfinite = True
            break
        own = (
            inception.pool_and_logits(samples, conf) if inception_only else (features(family, samples, conf),)
        )
        dino = (dinov2.features(samples, conf.batch_size),) if "fd_dinov2" in extras else ()
        feats.append((idx.start, own + dino + ((samples,) if keep_samples else ())))
    if distributed.all_reduce_sum(torch.tensor([float(nonfinite)])).item() > 0:
        return {"fid": None, "nonfinite": True}
    gathered = sorted(
        (item for part in distributed.gather_objects(feats) for item in part), key=lambda t: t[0]
    )
    pool = torch.cat([f[0] for _, f in gathered])
    result = {"fid": fid.frechet_distance(fid.statistics(pool), ref_stats)}
    if with_is:
        result["is"], result["is_std"] = fid.inception_score(torch.cat([f[1] for _, f in gathered]))
    if real is not None:
        result["precision"], result["recall"] = fid.precision_recall(pool, real["pool"])
        if "prdc" in extras:
            result["density"], result["coverage"] = fid.density_coverage(pool, real["pool"])
        if "fd_dinov2" in extras:
            dino = torch.cat([f[2] for _, f in gathered])
            result["fd_dinov2"] = fid.frechet_distance(fid.statistics(dino), fid.statistics(real["dinov2"]))
    if keep_features:
        result["features"] = pool.double()
    if keep_samples:
        result["samples"] = torch.cat([f[-1] for _, f in gathered])
    return result


def add_metric_flags(parser) -> None:
    """`--inception_weights`, `--metrics fid,fd_dinov2,prdc` and `--real REAL_SRC`, the flags every
    `calculate_fid.py` shares (`metric_options` reads them back)."""
    parser.add_argument("--inception_weights", help="torch-fidelity InceptionV3 weights file")
    parser.add_argument("--metrics", type=parse_metrics, default=["fid"],
                        help="fid,fd_dinov2,prdc (fd_dinov2, prdc and precision/recall against --real)")
    parser.add_argument(
        "--real", metavar="REAL_SRC", help="real images (a folder, an .npz or a synthetic set)"
    )


def metric_options(args) -> dict:
    """The `score_checkpoint` keywords that the flags of `add_metric_flags` set."""
    return {"inception_weights": args.inception_weights, "metrics": args.metrics, "real": args.real}


def print_result(record: dict) -> None:
    """A `calculate_fid.py` result: `record` as one JSON line on stdout, on rank 0."""
    if distributed.is_main():
        print(json.dumps(record))


def score_checkpoint(family, path: str, sampler, seeds: tuple[int, int], batch_size: int, ref: str, *,
                     arch: str | None = None, codec: str | None = None, inception_weights: str | None = None,
                     img_size: int | None = None, with_is: bool = False, metrics=("fid",),
                     real: str | None = None) -> dict:
    """Collective: what every family's `calculate_fid.py` does. Fetch the reference `ref` (a path or a
    URL), load the checkpoint `path` on this rank's device, check `img_size` (when given) against the
    model's, and `generate_and_score` it. Returns {'fid'} (and 'is', 'is_std' with `with_is`; with a
    `real` image source 'precision', 'recall' and the `metrics` besides fid: 'fd_dinov2', 'density',
    'coverage')."""
    check_metrics(list(metrics), real, "--metrics", "--real")
    conf = inception.FidConfig(inception_weights=inception_weights)
    ref_stats = stats.fetch(ref)
    extras = frozenset(metrics) - {"fid"}
    real_feats = real_features(real, conf, extras) if real else None
    model = family.load(path, arch, distributed.device(), codec=codec)
    if img_size is not None and img_size != model.image_size:
        raise NeonError(f"--img_size {img_size}, but {path} makes {model.image_size} px images")
    return generate_and_score(family, model, sampler, seeds, batch_size, conf, ref_stats, with_is=with_is,
                              real=real_feats, extras=extras)


def real_features(source: str, conf: inception.FidConfig, extras=()) -> dict:
    """Collective: {'pool': Inception pool features float32 [M, 2048]} of the images of `source` (any
    image source of `neon.metrics.images`), with 'dinov2' (float64 [M, 1024]) when 'fd_dinov2' is in
    `extras`; the same on every rank."""
    images = image_sources.source(source)
    if len(images) <= fid.PR_NEIGHBOURS:
        raise NeonError(
            f"{source}: precision/recall needs more than {fid.PR_NEIGHBOURS} real images, got {len(images)}"
        )
    result = {"pool": fid.features_of(images, conf)["pool"]}
    if "fd_dinov2" in extras:
        for record in dinov2.extract(images, conf.batch_size):
            if record.result is not None:
                result.update(record.result)
    return result
