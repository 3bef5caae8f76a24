"""Spread of the quick toy appendix's measured figures, from which its test's bounds are derived.

The quick appendix's diffusion ζ = 1.1 setting (tests/toy/test_appendix.py) yields two measured
figures: the base's Fréchet distance and the best w's, as a ratio to the base, after 50 and 250
fine-tune epochs. Both are figures of a trained network, so they move with anything that perturbs
training: the base's seed, and on another machine the float kernels (another blocking of the same
sums). This runs the setting in fresh processes over base seeds and over kernel choices for seed 0,
and prints each run and the mean and standard deviation of each group (log scale for the ratios).

    python benchmarks/appendix_spread.py [--seeds 12] [--kernels]
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, sys
from neon.toy import appendix, train
seed, out = int(sys.argv[1]), sys.argv[2]
trained = train.train_base
appendix.train_base = lambda kind, steps=None, lr=None: trained(kind, steps, lr, seed=seed)
rows = appendix.run_setting(out, appendix.SETTINGS[0], (50, 250), appendix.W_GRID[True]["diffusion"],
                            appendix.EVAL_NUM[True], True, "notebook")
print(json.dumps({"base": rows[0]["base"], **{f"ratio{r['epochs']}": r["best"] / r["base"] for r in rows}}))
"""
# Kernel choices one machine can make: ATen's vector level and MKL's code path (the toy's networks
# are all Linear layers: MKL's GEMM; oneDNN is not involved).
KERNELS = [
    {},
    {"ATEN_CPU_CAPABILITY": "default"},
    {"MKL_CBWR": "COMPATIBLE"},
    {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"},
]


def run(seed: int, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(seed), out],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            check=True,
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def describe(name: str, rows: list[dict]) -> None:
    """Mean and sd of each figure (the ratios on a log scale) and the 3-sd bounds a test may use."""
    for key, scale in (("base", "linear"), ("ratio50", "log"), ("ratio250", "log")):
        values = [r[key] for r in rows]
        if scale == "log":
            values = [math.log(v) for v in values]
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
        low, high = mean - 3 * sd, mean + 3 * sd
        if scale == "log":
            low, high = math.exp(low), math.exp(high)
        print(
            f"{name:>8} {key:>9}: mean {mean:+.4f} sd {sd:.4f} ({scale}, n={len(values)}); "
            f"range {min(r[key] for r in rows):.4f} .. {max(r[key] for r in rows):.4f}; "
            f"mean ± 3 sd: {low:.3f} .. {high:.3f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=12, help="base seeds 0 .. N-1")
    parser.add_argument("--kernels", action="store_true", help="also seed 0 under every kernel choice")
    args = parser.parse_args()
    groups = {"seeds": [(seed, {}) for seed in range(args.seeds)]}
    if args.kernels:
        groups["kernels"] = [(0, env) for env in KERNELS]
    results = {}
    for name, plan in groups.items():
        results[name] = []
        for seed, env in plan:
            row = run(seed, env)
            results[name].append(row)
            print(json.dumps({"group": name, "seed": seed, "env": env, **row}), flush=True)
    for name, rows in results.items():
        describe(name, rows)


if __name__ == "__main__":
    main()
