"""The timing loop the sampler benchmarks share: alternate the runs, take medians, print rates and a ratio.

Imported by the scripts of this folder as `timing` (a script's own folder is first on sys.path).
"""

import time

import numpy as np
import torch


def compare(
    runs: dict, items: int, repeats: int, device: str = "cpu", unit: str = "images"
) -> dict[str, float]:
    """Time each zero-argument callable of `runs` `repeats` times, alternating them so a change in the
    machine's load hits all alike; print each one's median rate (`items` per call, per second) and the
    ratio of the last run to the first (ours / baseline). Returns the rates."""
    timings = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            timings[name].append(time.perf_counter() - start)
    rate = {name: items / float(np.median(t)) for name, t in timings.items()}
    width = max(map(len, rate))
    for name, r in rate.items():
        print(f"{name:>{width}}: {r:10.1f} {unit}/s (median of {repeats})")
    baseline, ours = list(rate)[0], list(rate)[-1]
    print(f"ratio {ours} / {baseline}: {rate[ours] / rate[baseline]:.2f}")
    return rate
