"""Steps/s of the fine-tune with and without its input pipeline (`finetune.workers`).

1. A fine-tune whose device step is a stand-in for an H100's (`--step` seconds of waiting, the GIL
   released) on a synthetic set of 256² images, with VAR's real CPU-side preparation (`VAR.family`'s
   `prepare`: Lanczos resize to 288², random crop, [-1, 1]) of `--batch` images per step: `neon.finetune.run`
   itself, with 0 workers (each batch read and prepared when its step starts, as before the pipeline)
   and with `--workers`.
2. The real tiny-VAR fine-tune on the CPU, with 0 workers and with `--workers`: no slower.

The last line is `ratio N.NN`, the stand-in's steps/s with the pipeline over without.

    python benchmarks/finetune_pipeline.py [--step 0.3] [--batch 96] [--workers 2] [--steps 10]
"""

import argparse
import dataclasses
import tempfile
import time

import torch

from neon import finetune, progress, synthetic
from neon.family import Model
from neon.io import checkpoint
from VAR.family import VARFamily


@dataclasses.dataclass(frozen=True)
class _Sampler:
    pass


class StandIn:
    """VAR's data and CPU-side preparation; a loss that waits `step` seconds, as a GPU step would."""

    name = "stand-in"
    Sampler = _Sampler
    format = checkpoint.Format(weight_keys=(("model",),))

    def __init__(self, step: float, size: int = 256):
        self.step, self.size = step, size

    def sample(self, model, labels, seeds, sampler):
        generator = torch.Generator().manual_seed(int(seeds[0]))
        shape = (len(seeds), 3, self.size, self.size)
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)

    def prepare(self, samples, generator):
        return VARFamily().prepare(samples, generator)

    def loss(self, model, samples, labels, generator):
        time.sleep(self.step)  # the GPU step: the host thread waits, the GIL released
        return model.net(samples.mean(dim=(1, 2, 3), keepdim=True)[:, :1, 0, 0]).mean()

    def container(self, model, state_dict):
        return {"model": state_dict}


def steps_per_second(fam, model, data: str, out: str, batch: int, steps: int, workers: int) -> float:
    """Steps/s of `steps` fine-tune steps after a first one (which fills the pipeline)."""
    conf = finetune.FinetuneConfig(
        data=data, out=out, total_images=batch * (steps + 1), batch_size=batch, workers=workers
    )
    times = [time.perf_counter() for _ in finetune.run(fam, model, conf)]
    return steps / (times[-1] - times[1])  # from the end of the first step to the end of the last


def draw_set(fam, model, out: str, num: int, batch: int) -> str:
    conf = synthetic.SyntheticConfig(out=out, num=num, batch_size=batch, shard_size=num, labels="balanced")
    progress.last(synthetic.write(fam, model, fam.Sampler(), conf, "benchmark"))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", type=float, default=0.3, help="seconds of the stand-in device step")
    parser.add_argument("--batch", type=int, default=96, help="images per step (VAR-d16's per-GPU batch)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        var = VARFamily()
        tiny = var.tiny(0)
        tiny_data = draw_set(var, tiny, f"{tmp}/tiny-set", 128, 32)
        for workers in (0, args.workers):
            rate = steps_per_second(
                var, var.tiny(0), tiny_data, f"{tmp}/tiny-{workers}", 16, 2 * args.steps, workers
            )
            print(f"tiny VAR on the CPU, batch 16, {workers} workers: {rate:.2f} steps/s", flush=True)

        fam = StandIn(args.step)
        model = Model(net=torch.nn.Linear(1, 1), image_size=256, num_classes=1000)
        data = draw_set(fam, model, f"{tmp}/set", 4 * args.batch, args.batch)
        rates = {}
        for workers in (0, args.workers):
            out = f"{tmp}/run-{workers}"
            rates[workers] = steps_per_second(fam, model, data, out, args.batch, args.steps, workers)
            print(
                f"stand-in step {args.step:g} s + VAR preparation of {args.batch} images of 256², "
                f"{workers} workers: {rates[workers]:.2f} steps/s",
                flush=True,
            )
    print(f"ratio {rates[args.workers] / rates[0]:.2f}")


if __name__ == "__main__":
    main()
