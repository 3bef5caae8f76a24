"""Images generated to choose (snapshot, w, cfg), per search strategy, against the full grid.

For each family, one Neon run (a base, a synthetic set drawn with a mode-seeking sampler, a
fine-tune with several snapshots) is swept once per strategy (`sweep.search`), each in a folder of
its own so no strategy reuses another's points, and each with the final report (3 disjoint seed
ranges of `final_num`, the same seeds for every strategy). It prints, per strategy, the images the
selection generated and their ratio to the grid's, the chosen point, its final FID (mean ± sd over
the 3 ranges) and its distance to the grid's chosen point's final FID, against the spread (the
larger of the two sds). The goal: brent/coordinate with successive halving generate <= 1/5 of the
grid's images and land within the spread of the grid's optimum.

* toy: the diffusion toy of the demo's quick base (2k steps), S = 1,000 points at ζ = 1.1,
  250 epochs of fine-tuning with a snapshot every 50 (5 snapshots), w over the recipe's grid
  -2:2:0.25, scored with the plain sampler (ζ = 1) on 20,000 samples (final: 3 × 20,000).
  Without cfg, coordinate is brent.
* pixels: the test suite's 8×8 image family (tests/families/custom_family.py, x = tanh(W z + b))
  with a stand-in for guidance (cfg moves every image along a fixed "class" direction by cfg − 1
  and scales the latent by cfg ** 0.3), against a teacher generator whose images are the real ones;
  the base is the teacher with W scaled by 0.7 (underdispersed) and its bias off the class direction
  (right at cfg 1.3); S = 2,000 images at cfg 1.3; 3 snapshots; (w, cfg) over 0:3:0.25 × 1.0…1.8,
  2,000 samples per point (final: 3 × 2,000). Its features are a fixed random projection of the
  pixels to 32 dimensions, not Inception's (Inception on 2 CPU cores runs ~1 image/s: hours for a
  grid): the benchmark measures the search, not Inception.

    python benchmarks/sweep_cost.py [--quick]   # 3.5 min on 2 CPU cores
                                                # (--quick: a quarter and half the samples)
"""

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from neon import finetune, progress, sweep, synthetic  # noqa: E402
from neon.family import write_checkpoint  # noqa: E402
from neon.io import files  # noqa: E402
from neon.metrics import fid  # noqa: E402
from neon.toy import appendix  # noqa: E402
from neon.toy.family import ToySampler  # noqa: E402
from neon.toy.family import family as toy  # noqa: E402
from tests.families.custom_family import CustomFamily  # noqa: E402

STRATEGIES = [
    ("grid", {}),
    ("grid + halving", {"search": "grid", "screen_num": "quarter"}),
    ("brent + halving", {"search": "brent"}),
    ("coordinate + halving", {"search": "coordinate"}),
    ("coordinate + refine", {"search": "coordinate", "refine": 0.1}),
]


@dataclasses.dataclass(frozen=True)
class PixelSampler:
    cfg: float = 1.0
    """A stand-in for guidance: it moves every image along a fixed direction (a "class") by cfg − 1
    and scales the latent by cfg ** 0.3 (guidance also saturates)."""


class PixelFamily(CustomFamily):
    """The custom test family (x = tanh(W z + b)) with a cfg, its own features (a fixed random
    projection of the pixels to 32-d) and a teacher's reference statistics."""

    name = "pixels"
    Sampler = PixelSampler

    def __init__(self):
        generator = torch.Generator().manual_seed(7)
        self.projection = torch.randn(3 * 8 * 8, 32, generator=generator, dtype=torch.float64) / 8
        self.direction = 0.3 * torch.randn(3 * 8 * 8, generator=generator)
        self._reference = None

    def sample(self, model, labels, seeds, sampler):
        z = torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        with torch.inference_mode():
            x = torch.tanh(model.net.map(z * sampler.cfg**0.3) + (sampler.cfg - 1) * self.direction)
        return ((x.view(-1, 3, 8, 8) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def features(self, samples):
        return (samples.double().flatten(1) / 127.5 - 1) @ self.projection

    def reference(self):
        return self._reference


def self_train(
    family, base: str, sampler, syn: synthetic.SyntheticConfig, ft: finetune.FinetuneConfig
) -> None:
    """Write S with `sampler` from the base at `base`, then fine-tune a copy of the base on it."""
    for _ in synthetic.write(family, family.load(base), sampler, syn, files.sha256(base)):
        pass
    for _ in finetune.run(family, family.load(base), ft):
        pass


def toy_run(work: str, quick: bool) -> dict:
    """The toy's base, S and fine-tune; the sweep settings."""
    base = appendix.base(work, "diffusion", quick=True)
    syn = synthetic.SyntheticConfig(
        out=os.path.join(work, "toy-S"), num=1000, batch_size=1000, shard_size=1000, labels="none"
    )
    ft = finetune.FinetuneConfig(
        data=syn.out,
        out=os.path.join(work, "toy-run"),
        total_images=250_000,
        batch_size=1000,
        lr=1e-5,
        snapshot_every_images=50_000,
    )
    self_train(toy, base, ToySampler(zeta=1.1), syn, ft)
    num = 5000 if quick else 20_000
    return {
        "family": toy,
        "base": base,
        "sampler": ToySampler(),
        "self_trained": ft.out,
        "sweep": dict(w="-2:2:0.25", num=num, final_num=num, batch_size=num, sampler={"zeta": 1.0}),
    }


def pixel_run(work: str, quick: bool) -> dict:
    """The pixel family's teacher (the reference), base, S and fine-tune; the sweep settings."""
    pixels = PixelFamily()
    teacher = pixels.tiny(1)  # its images are the real ones
    real = pixels.sample(teacher, None, torch.arange(20_000) + 50_000_000, PixelSampler())
    pixels._reference = fid.statistics(pixels.features(real))
    model = pixels.tiny(1)  # the base: underdispersed, and off the teacher's class direction unless cfg = 1.3
    with torch.no_grad():
        model.net.map.weight.mul_(0.7)
        model.net.map.bias.sub_(0.3 * pixels.direction)
    base = os.path.join(work, "pixels-base.pt")
    write_checkpoint(pixels, model.net.state_dict(), base, like=model)
    syn = synthetic.SyntheticConfig(
        out=os.path.join(work, "pixels-S"), num=2000, batch_size=500, shard_size=2000, labels="none"
    )
    ft = finetune.FinetuneConfig(
        data=syn.out,
        out=os.path.join(work, "pixels-run"),
        total_images=6000,
        batch_size=100,
        lr=1e-3,
        snapshot_every_images=2000,
    )
    self_train(pixels, base, PixelSampler(cfg=1.3), syn, ft)
    num = 1000 if quick else 2000
    return {
        "family": pixels,
        "base": base,
        "sampler": PixelSampler(),
        "self_trained": ft.out,
        "sweep": dict(
            w="0:3:0.25",
            cfg=[1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8],
            num=num,
            final_num=num,
            batch_size=num,
        ),
    }


def sweep_once(setup: dict, out: str, strategy: dict) -> dict:
    """One strategy's sweep (with its final report); its summary and wall time."""
    fields = {**setup["sweep"], **strategy}
    if fields.get("screen_num") == "quarter":
        fields["screen_num"] = fields["num"] // 4
    conf = sweep.SweepConfig(self_trained=setup["self_trained"], out=out, **fields)
    fam = setup["family"]
    started = time.perf_counter()
    summary = progress.last(sweep.run(fam, fam.load(setup["base"]), setup["base"], setup["sampler"], conf))
    return {"summary": summary, "seconds": time.perf_counter() - started}


def table(name: str, rows: dict) -> str:
    grid = rows["grid"]["summary"]
    lines = [
        f"{name}: {grid.evidence[-1]['points']} grid points at n = "
        f"{grid.num:,}; final report: 3 seed ranges of {grid.final.seeds[0][1]:,}",
        f"  {'strategy':<22} {'images to choose':>16} {'ratio':>6}  {'chosen (snapshot, w, cfg)':<32} "
        f"{'final FID, mean ± sd':>22} {'minus grid':>15} {'spread':>8} {'within':>6} {'s':>5}",
    ]
    for label, row in rows.items():
        s = row["summary"]
        cfg = "" if s.cfg is None else f", {s.cfg:g}"
        point = f"{os.path.basename(s.snapshot)[9:-3].lstrip('0')}, {s.w:+g}{cfg}"
        neon, grid_neon = s.final.neon["fid"], grid.final.neon["fid"]
        diff = neon.mean - grid_neon.mean
        spread = max(neon.sd, grid_neon.sd)
        ratio = s.selection_images / grid.selection_images
        lines.append(
            f"  {label:<22} {s.selection_images:>16,} {ratio:>6.3f}"
            f"  {point:<32} {neon.mean:>11.4g} ± {neon.sd:<8.2g} {diff:>+15.2g} "
            f"{spread:>8.2g} {'yes' if diff <= spread else 'no':>6} {row['seconds']:>5.0f}"
        )
    final = grid.final
    lines.append(
        f"  base: final FID {final.base['fid'].mean:.4g} ± {final.base['fid'].sd:.2g}; the grid's gain "
        f"{final.gain:+.3g} {'exceeds' if final.gain_exceeds_spread else 'does not exceed'} "
        f"the spread {final.spread:.2g}"
    )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples per point")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one, removed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sweep-cost-") as tmp, appendix.one_thread():
        work = args.out or tmp
        for name, make in (("toy", toy_run), ("pixels", pixel_run)):
            setup = make(work, args.quick)
            rows = {
                label: sweep_once(setup, os.path.join(work, f"{name}-{label.replace(' + ', '-')}"), strategy)
                for label, strategy in STRATEGIES
            }
            print(table(name, rows), flush=True)


if __name__ == "__main__":
    main()
