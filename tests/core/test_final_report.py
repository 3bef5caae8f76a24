"""The fair final report on the tests' pixel family (tests/families/custom_family.py) with a cfg
stand-in: the base is scored at its own best cfg of the selection, Neon at its chosen point, on the
same seed ranges, compared range by range; checked against numbers computed by hand from results.jsonl."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from neon import progress, report, sweep
from neon.family import write_checkpoint
from tests.families.custom_family import CustomFamily

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclasses.dataclass(frozen=True)
class CfgSampler:
    cfg: float = 1.0
    """A stand-in for guidance: every image moves along a fixed direction by cfg − 1."""


class CfgPixels(CustomFamily):
    """x = tanh(W z + b + (cfg − 1) d); features: a fixed projection of the pixels to 16-d; the
    reference: a teacher's images (b = 0)."""

    name = "cfg-pixels"
    Sampler = CfgSampler

    def __init__(self):
        generator = torch.Generator().manual_seed(3)
        self.projection = torch.randn(192, 16, generator=generator, dtype=torch.float64) / 8
        self.direction = 0.5 * torch.randn(192, generator=generator)
        self.ref = None

    def sample(self, model, labels, seeds, sampler):
        z = torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        with torch.inference_mode():
            x = torch.tanh(model.net.map(z) + (sampler.cfg - 1) * self.direction)
        return ((x.view(-1, 3, 8, 8) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def features(self, samples):
        return (samples.double().flatten(1) / 127.5 - 1) @ self.projection

    def reference(self):
        return self.ref


def test_the_base_is_scored_at_its_own_cfg_and_compared_range_by_range(tmp_path):
    from neon.metrics import fid

    fam = CfgPixels()
    teacher = fam.tiny(1)
    with torch.no_grad():
        teacher.net.map.bias.zero_()
    fam.ref = fid.statistics(
        fam.features(fam.sample(teacher, None, torch.arange(4000) + 10**7, CfgSampler()))
    )
    base, neon_self = fam.tiny(1), fam.tiny(1)
    with torch.no_grad():  # the base: underdispersed (W × 0.7) and off by −0.4 d (best at cfg 1.4); θ_s more
        # so (W × 0.5, −0.6 d): θ_neon = (1 + w) θ − w θ_s has W × (0.7 + 0.2 w) and −(0.4 − 0.2 w) d
        base.net.map.weight.mul_(0.7)
        base.net.map.bias.copy_(-0.4 * fam.direction)
        neon_self.net.map.weight.mul_(0.5)
        neon_self.net.map.bias.copy_(-0.6 * fam.direction)
    base_path, snapshot = str(tmp_path / "base.pt"), str(tmp_path / "run" / "snapshot-0000000100.pt")
    os.makedirs(tmp_path / "run")
    write_checkpoint(fam, base.net.state_dict(), base_path, like=base)
    write_checkpoint(fam, neon_self.net.state_dict(), snapshot, like=neon_self)
    conf = sweep.SweepConfig(
        self_trained=snapshot,
        w="0:2:0.5",
        cfg=[1.0, 1.2, 1.4, 1.6],
        num=200,
        final_num=100,
        final_seeds=4,
        batch_size=200,
        out=str(tmp_path / "sweep"),
    )
    summary = progress.last(sweep.run(fam, fam.load(base_path), base_path, CfgSampler(), conf))
    records = [json.loads(line) for line in open(tmp_path / "sweep" / sweep.RESULTS)]

    selection = [r for r in records if r["seeds"][0] == conf.seed_base]
    line = min((r for r in selection if r["w"] == 0), key=lambda r: r["fid"])
    chosen = min(selection, key=lambda r: r["fid"])
    assert (summary.base_cfg, summary.cfg, summary.w) == (line["cfg"], chosen["cfg"], chosen["w"])
    assert summary.base_cfg != summary.cfg and summary.w > 0  # the case this test is about
    finals = [r for r in records if r["seeds"][0] >= conf.final_seed_base]
    base_side = [r for r in finals if r["w"] == 0]
    neon_side = [r for r in finals if r["w"] != 0]
    assert {r["cfg"] for r in base_side} == {line["cfg"]} and {r["cfg"] for r in neon_side} == {chosen["cfg"]}
    by_range = {tuple(r["seeds"]): r["fid"] for r in base_side}
    differences = [
        r["fid"] - by_range[tuple(r["seeds"])] for r in sorted(neon_side, key=lambda r: r["seeds"])
    ]
    mean, sd = np.mean(differences), np.std(differences, ddof=1)
    half = scipy_stats.t.ppf(0.975, 3) * sd / math.sqrt(4)
    pair = summary.final.paired["fid"]
    assert pair.differences == pytest.approx(differences, rel=1e-12)
    assert (pair.mean, pair.sd, pair.low, pair.high) == pytest.approx(
        (mean, sd, mean - half, mean + half), rel=1e-9
    )
    assert pair.improved == sum(d < 0 for d in differences)
    expected = "better" if mean + half < 0 else "worse" if mean - half > 0 else "within the seed spread"
    assert summary.final.verdict == expected and (summary.final.base_cfg, summary.final.cfg) == (
        line["cfg"],
        chosen["cfg"],
    )
    text = report.table(
        {
            "summary": summary,
            "compute": report.compute(records, summary, _Model(), CfgSampler(), [snapshot]),
            "pictures": {},
            "notes": [],
        }
    )
    assert f"the base at its own cfg ({line['cfg']:g})" in text and f"cfg {chosen['cfg']:g})" in text
    pinned = dataclasses.replace(conf, base_cfg=1.0)
    again = progress.last(sweep.run(fam, fam.load(base_path), base_path, CfgSampler(), pinned))
    assert again.base_cfg == 1.0 and again.final.base_cfg == 1.0 and again.final.cfg == chosen["cfg"]


@dataclasses.dataclass(frozen=True)
class _Model:
    base_training_images: int | None = None
