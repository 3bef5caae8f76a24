"""The digits FID's power to see Neon: raw penultimate features (the baseline) against the whitened
features the digits family scores with, on the same samples.

It reuses a finished `neon demo digits` directory: the classifier, the base, θ_s's last snapshot and
the chosen w (`results.json`; `--w` sets another). It draws the base and Neon once on the report's
first k ranges of n seeds (the same seeds for both, as the report pairs them), and scores every
range twice: with the raw 64-unit layer against the reference images' raw statistics, and with the
family's whitened features against theirs. For each feature space it prints the means, the real row
at the same n, the paired Neon − base difference with its 95% interval, the interval's half-width as
a share of the base's FID (the precision of a relative claim) and |mean| / half-width (how many
interval half-widths the effect spans), then the ratios whitened / raw of the last two.

    python benchmarks/digits_metric_power.py DEMO_DIR [--ranges 25] [--w W]
"""

import argparse
import os

from edm.digits import data, demo
from edm.digits.family import DigitsFamily
from neon import evaluate, finetune
from neon import family as neon_family
from neon.errors import NeonError
from neon.metrics import fid
from neon.threads import one_thread


def measure(demo_out: str, result: dict, ranges: int, w: float) -> dict:
    """{'raw' | 'whitened': {'base', 'neon', 'real', 'paired', 'half', 'relative', 'span'}} of the
    demo in `demo_out` (`result`: its results.json), Neon at `w`."""
    s = result["settings"]
    split = data.split_of(s["data"])
    net, _ = demo._classifier(demo_out, split, s["classifier"])
    fam = DigitsFamily(net, split)
    base_path = os.path.join(demo_out, "base.pt")
    model = fam.load(base_path)
    base = neon_family.read_checkpoint(fam, base_path).weights
    self_path = finetune.snapshots(os.path.join(demo_out, "self-train"))[-1]
    self_trained = neon_family.read_checkpoint(fam, self_path).weights
    sampler = fam.Sampler(**s["sampler"])
    drawn = {"base": [], "neon": []}
    for start, num in result["report"]["seeds"][:ranges]:
        for name, kwargs in (("base", {}), ("neon", {"self_trained": self_trained, "w": w})):
            out = evaluate.evaluate(fam, model, base, sampler, (start, num), num, None, **kwargs)
            drawn[name].append(out["samples"])
    spaces = {"raw": fam.raw_features, "whitened": fam.features}
    real = split["real"][0][: result["report"]["num"]]
    scores = {}
    for space, features in spaces.items():
        reference = fid.statistics(features(split["reference"][0]))

        def score(images, features=features, reference=reference):
            return fid.frechet_distance(fid.statistics(features(images)), reference)

        per_model = {name: [score(x) for x in samples] for name, samples in drawn.items()}
        paired = evaluate.paired(per_model["neon"], per_model["base"])
        half = (paired.high - paired.low) / 2
        base_mean = sum(per_model["base"]) / len(per_model["base"])
        scores[space] = {
            "base": base_mean,
            "neon": sum(per_model["neon"]) / len(per_model["neon"]),
            "real": score(real),
            "paired": [paired.mean, paired.low, paired.high],
            "half": half,
            "relative": half / base_mean,
            "span": abs(paired.mean) / half,
        }
    return scores


def table(scores: dict, k: int, n: int, w: float) -> str:
    lines = [
        f"Neon at w={w:+g}; k={k} ranges of n={n}; the same samples in both feature spaces",
        f"{'features':<9} {'real':>6} {'base':>7} {'Neon':>7} {'Neon − base [95%]':>24} "
        f"{'half/base':>9} {'|mean|/half':>11}",
    ]
    for space, r in scores.items():
        mean, low, high = r["paired"]
        lines.append(
            f"{space:<9} {r['real']:>6.2f} {r['base']:>7.2f} {r['neon']:>7.2f} "
            f"{mean:>+7.2f} [{low:+6.2f}, {high:+6.2f}]  {r['relative']:>8.1%} {r['span']:>11.1f}"
        )
    raw, white = scores["raw"], scores["whitened"]
    lines.append(
        f"whitened / raw: half/base {white['relative'] / raw['relative']:.2f}×, "
        f"|mean|/half {white['span'] / raw['span']:.2f}×"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("demo_out", help="a finished `neon demo digits` directory")
    p.add_argument("--ranges", type=int, default=25, help="the report's first k ranges (default 25)")
    p.add_argument("--w", type=float, default=None, help="Neon's w (default: the demo's chosen w)")
    args = p.parse_args(argv)
    try:
        result = demo.finished(args.demo_out)
    except NeonError as e:
        p.error(str(e))
    w = result["best_w"] if args.w is None else args.w
    with one_thread():
        scores = measure(args.demo_out, result, args.ranges, w)
    print(table(scores, args.ranges, result["report"]["num"], w))


if __name__ == "__main__":
    main()
