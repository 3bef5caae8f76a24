"""Fine-tuning memory against the size of the synthetic set: the streamed reader keeps it flat.

Writes two synthetic sets of 64×64 images with `neon.synthetic.write` (a large one of at least 3 GB
and one 10× smaller), then fine-tunes a tiny model for a few steps on each, in a fresh process, and
prints each run's peak resident memory and start-up time (from the call to the first optimizer
step: opening the set, its integrity check, the model), and

    ratio = (peak RSS on the large set − peak RSS on the small set) / (large set size − small set size)

A reader that loads the set whole has a ratio of at least 1; the goal is ≤ 0.05.

    python benchmarks/finetune_memory.py [--images 270000] [--dir DIR] [--steps 20]
"""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from neon import synthetic
from neon.family import Model
from neon.io import checkpoint

SIDE, LATENT = 64, 8


@dataclasses.dataclass(frozen=True)
class Sampler:
    pass


class Tiny:
    """A linear image generator: enough to exercise the fine-tune's data path."""

    name = "bench"
    Sampler = Sampler
    format = checkpoint.Format(weight_keys=(("model",),))

    def tiny(self, seed=0):
        torch.manual_seed(seed)
        return Model(net=torch.nn.Linear(LATENT, 3 * SIDE * SIDE), image_size=SIDE)

    def sample(self, model, labels, seeds, sampler):
        z = torch.randn(len(seeds), LATENT, generator=torch.Generator().manual_seed(int(seeds[0])))
        with torch.inference_mode():
            return ((torch.tanh(model.net(z)) + 1) * 127.5).to(torch.uint8).view(-1, 3, SIDE, SIDE)

    def loss(self, model, samples, labels, generator):
        z = torch.randn(len(samples), LATENT, generator=generator)
        return (model.net(z) - samples.float().flatten(1) / 127.5 + 1).square().mean()

    def container(self, model, state_dict):
        return {"model": state_dict}


family = Tiny()

CHILD = """
import json, resource, sys, time
start = time.perf_counter()
from benchmarks.finetune_memory import family
from neon import finetune
conf = finetune.FinetuneConfig(data=sys.argv[1], out=sys.argv[2], total_images=64 * int(sys.argv[3]),
                               batch_size=64, lr=1e-4)
steps = finetune.run(family, family.tiny(), conf)
next(steps), next(steps)  # the starting position, then the first step
startup = time.perf_counter() - start
for _ in steps:
    pass
print(json.dumps({"startup_s": startup,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_set(out: str, num: int) -> int:
    conf = synthetic.SyntheticConfig(out=out, num=num, batch_size=1000, shard_size=10_000, labels="none")
    if not os.path.exists(os.path.join(out, synthetic.MANIFEST)):
        for _ in synthetic.write(family, family.tiny(), Sampler(), conf, "none"):
            pass
    return sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if n.startswith("shard-"))


def finetune_in_a_fresh_process(data: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as run:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        done = subprocess.run(
            [sys.executable, "-c", CHILD, data, run, str(steps)],
            capture_output=True,
            text=True,
            cwd=root,
            env={**os.environ, "PYTHONPATH": root},
            check=True,
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--images", type=int, default=270_000, help="images of the large set (12 KiB each: 3.3 GB)"
    )
    parser.add_argument(
        "--dir", default=None, help="where to write the sets (default: a temp dir, removed after)"
    )
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of batch 64 per run")
    args = parser.parse_args()
    top = args.dir or tempfile.mkdtemp(prefix="neon-ft-memory-")
    try:
        rows = {}
        for name, num in (("small", args.images // 10), ("large", args.images)):
            started = time.perf_counter()
            size = write_set(os.path.join(top, name), num)
            written = time.perf_counter() - started
            rows[name] = {
                "images": num,
                "bytes": size,
                "write_s": written,
                **finetune_in_a_fresh_process(os.path.join(top, name), args.steps),
            }
            r = rows[name]
            print(
                f"{name:>5}: {num:7d} images, {size / 2**30:6.2f} GiB (written in {written:5.1f} s); "
                f"fine-tune start-up {r['startup_s']:5.2f} s, peak RSS {r['peak_rss'] / 2**30:5.2f} GiB",
                flush=True,
            )
        growth = rows["large"]["peak_rss"] - rows["small"]["peak_rss"]
        ratio = growth / (rows["large"]["bytes"] - rows["small"]["bytes"])
        print(f"peak RSS growth / set size growth: {ratio:.4f} (goal <= 0.05; a set loaded whole: >= 1)")
    finally:
        if args.dir is None:
            shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
