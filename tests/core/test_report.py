"""`neon.report` on finished toy runs: the final table with mean ± sd over the seed ranges, the
compute lines, and the three pictures (valid PNGs of the stated sizes)."""

import dataclasses
import struct
import types

import pytest
import torch

from neon import cli, plots, report, sweep
from neon.family import ModelConfig, write_checkpoint
from neon.toy.family import ToyFamily, ToySampler
from tests.conftest import save_base
from tests.families.custom_family import family as custom


@dataclasses.dataclass(frozen=True)
class CfgSampler:
    cfg: float = 1.0
    """The diffusion toy's score scale ζ, under the name of a guidance scale, so (w, cfg) is swept."""


class CfgToy(ToyFamily):
    """The toy family with a `cfg` (`--family tests.core.test_report:cfg_toy`)."""

    name = "cfgtoy"
    Sampler = CfgSampler

    def sample(self, model, labels, seeds, sampler):
        return super().sample(model, labels, seeds, ToySampler(zeta=sampler.cfg))


cfg_toy = CfgToy()


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _toy_run(tmp_path, family_spec, sampler_flags, sweep_flags):
    """sample → finetune (2 snapshots) → sweep through the CLI; the sweep folder."""
    base = save_base(tmp_path / "base.pt")
    S, run, out = (str(tmp_path / name) for name in ("S", "run", "sweep"))
    common = ["--family", family_spec, "--model.base_training_images", "1000000"]
    cli.main(
        [
            "sample",
            *common,
            "--ckpt",
            base,
            "--out",
            S,
            "--synthetic.num",
            "64",
            "--batch-size",
            "64",
            "--shard-size",
            "64",
            "--synthetic.labels",
            "none",
            *sampler_flags,
        ]
    )
    cli.main(
        [
            "finetune",
            *common,
            "--ckpt",
            base,
            "--data",
            S,
            "--out",
            run,
            "--images",
            "128",
            "--batch-size",
            "32",
            "--lr",
            "1e-3",
            "--snapshot-every",
            "64",
        ]
    )
    cli.main(
        [
            "sweep",
            *common,
            "--base",
            base,
            "--self",
            run,
            "--sweep.num",
            "128",
            "--batch-size",
            "128",
            "--final-num",
            "64",
            "--out",
            out,
            *sweep_flags,
        ]
    )
    return out


def test_report_of_a_toy_run_with_a_joint_w_cfg_search(tmp_path, capsys, one_thread):
    out = _toy_run(
        tmp_path,
        "tests.core.test_report:cfg_toy",
        ["--sampler.cfg", "1.1"],
        [
            "--w",
            "-1:1:0.25",
            "--sweep.cfg",
            "[0.9, 1.0, 1.1]",
            "--sweep.search",
            "coordinate",
            "--sweep.sampler",
            "{cfg: 1.0}",
        ],
    )
    result = report.run(out)
    s, c = result["summary"], result["compute"]
    records = sweep.load_results(out)
    finals = [r for r in records if r["seeds"][0] >= 2_000_000]
    assert s.final.seeds == [[2_000_000, 64], [2_000_064, 64], [2_000_128, 64]]
    assert {tuple(r["seeds"]) for r in finals} == {tuple(seeds) for seeds in s.final.seeds}
    base = [r["fid"] for r in finals if r["snapshot"] == "base"]
    assert s.final.base["fid"].mean == pytest.approx(sum(base) / 3) and s.final.base["fid"].min == min(base)
    assert (
        s.final.base["fid"].sd > 0 and s.search == "coordinate" and [e["n"] for e in s.evidence] == [32, 128]
    )
    text = report.table(result)
    assert (
        f"{s.final.base['fid'].mean:.4g} ± {s.final.base['fid'].sd:.2g} (min {s.final.base['fid'].min:.4g})"
        in text
    )
    assert "final report: 3 seed ranges of 64 samples from seed 2,000,000" in text
    assert (
        f"the spread {s.final.spread:.4g} (the larger sd)" in text and "19 points at n = 32" in text
    )  # 17 + the base's cfg line
    # compute: S, the selection's evaluations, the final report; the fine-tune against the base's training
    assert (c["synthetic_images"], c["finetune_images"], c["base_training_images"]) == (64, 128, 1_000_000)
    assert c["selection_images"] == sum(r["num"] for r in records if r["seeds"][0] == 1_000_000)
    assert c["final_images"] == 64 * len(finals) and c["generated_images"] == 64 + sum(
        r["num"] for r in records
    )
    assert c["chosen_snapshot_images"] in (0, 64, 128)
    assert c["finetune_run_percent"] == pytest.approx(100 * 128 / 1e6) and c["steps_per_image"] is None
    assert c["forward_percent"] == pytest.approx(100 * (3 * 128 + c["generated_images"]) / 3e6)
    assert f"{c['generated_images']:,} images" in text
    assert "1 per generated image (a lower bound: the sampler names no steps)" in text
    sizes = {name: _png_size(path) for name, path in result["pictures"].items()}
    assert sizes == {
        "fid_vs_w": plots.SIZE_FID,
        "fid_w_cfg": plots.SIZE_HEATMAP,
        "samples": plots.SIZE_SCATTER,
    }


def test_report_of_a_w_sweep_skips_the_heat_map_and_says_so(tmp_path, one_thread):
    out = _toy_run(
        tmp_path,
        "toy",
        ["--sampler.zeta", "1.1"],
        ["--w", "-1:1:0.5", "--sweep.sampler", "{zeta: 1.0}", "--sweep.final_seeds", "1"],
    )
    result = report.run(out)
    text = report.table(result)
    assert (
        result["pictures"]["fid_w_cfg"] is None and "fid_w_cfg.png: not written (cfg was not swept)" in text
    )
    assert "(one range: no spread)" in text and result["summary"].final.base["fid"].sd is None
    assert (
        result["compute"]["steps_per_image"] == 20 and "20 per generated image (the sampler's steps)" in text
    )
    assert _png_size(result["pictures"]["fid_vs_w"]) == plots.SIZE_FID
    assert _png_size(result["pictures"]["samples"]) == plots.SIZE_SCATTER


def test_samples_of_an_image_family_are_a_grid_of_the_same_seeds(tmp_path):
    tiny = custom.tiny(0)
    base, snapshot = str(tmp_path / "base.pt"), str(tmp_path / "snapshot-0000000032.pt")
    write_checkpoint(custom, tiny.net.state_dict(), base, like=tiny)
    write_checkpoint(custom, {k: v + 0.1 for k, v in tiny.net.state_dict().items()}, snapshot, like=tiny)
    conf = sweep.SweepConfig(self_trained=snapshot, final_num=16)
    path = report._samples(
        custom,
        ModelConfig(ckpt=base),
        custom.Sampler(),
        conf,
        types.SimpleNamespace(w=1.0, snapshot=snapshot, cfg=None),
        str(tmp_path),
    )
    # 8 images of 8 px shown at 6x, plus the row titles' margin: plots.sample_grid's stated size
    assert _png_size(path) == (8 * 8 * 6 + 120, 2 * (8 * 6 + 8) + 16)
    seeds = torch.arange(8) + conf.final_seed_base
    assert not torch.equal(
        custom.sample(tiny, torch.full((8,), -1), seeds, custom.Sampler())[0],
        custom.sample(tiny, torch.full((8,), -1), seeds + 1, custom.Sampler())[0],
    )
