import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from neon import finetune, merge, search, sweep
from neon.errors import NeonError
from neon.family import Model, read_checkpoint, write_checkpoint
from neon.io import checkpoint
from neon.metrics import fid, score
from neon.toy.family import ToySampler, family


def test_grid_parsing():
    assert search.grid("0:2:0.5") == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert search.grid("-1:1:0.125")[:3] == [-1.0, -0.875, -0.75] and len(search.grid("-1:1:0.125")) == 17
    assert (
        search.grid("0,0.3") == [0.0, 0.3] and search.grid([1, 2]) == [1.0, 2.0] and search.grid(0.5) == [0.5]
    )
    for bad in ("0:2", "2:0:1", "a,b", "0:1:0", [float("nan")]):
        with pytest.raises(NeonError, match="bad w grid"):
            search.grid(bad)


def test_frechet_distance_matches_the_closed_form():
    # diagonal covariances: FD = |mu_a - mu_b|^2 + sum (sqrt(a) - sqrt(b))^2
    a = (np.array([1.0, 0.0]), np.diag([4.0, 1.0]))
    b = (np.array([0.0, 2.0]), np.diag([1.0, 9.0]))
    assert fid.frechet_distance(a, b) == pytest.approx(5.0 + 1.0 + 4.0, rel=1e-12)
    x = torch.randn(1000, 2, dtype=torch.float64)
    mu, sigma = fid.statistics(x)
    # a squared distance: never below 0, though rounding can take the formula to -1e-12
    assert np.allclose(sigma, np.cov(x.numpy().T))
    assert 0 <= fid.frechet_distance((mu, sigma), (mu, sigma)) < 1e-10


@pytest.fixture
def run_dir(tmp_path, base_ckpt, synthetic_set):
    conf = finetune.FinetuneConfig(
        data=synthetic_set,
        out=str(tmp_path / "run"),
        total_images=192,
        batch_size=32,
        lr=1e-3,
        snapshot_every_images=96,
    )
    for _ in finetune.run(family, family.load(base_ckpt), conf):
        pass
    return conf.out


def _sweep(base_ckpt, run_dir, tmp_path, **kw):
    conf = sweep.SweepConfig(
        **{
            **dict(
                self_trained=run_dir,
                w="-1:1:1",
                num=64,
                batch_size=16,
                final_num=32,
                out=str(tmp_path / "sweep"),
                sampler={"zeta": 1.0},
            ),
            **kw,
        }
    )
    return conf, [
        r.info
        for r in sweep.run(family, family.load(base_ckpt), base_ckpt, ToySampler(zeta=1.1), conf)
        if r.info is not None
    ]


def test_sweep_records_every_point_and_matches_a_direct_evaluation(tmp_path, base_ckpt, run_dir):
    conf, records = _sweep(base_ckpt, run_dir, tmp_path)
    snapshots = finetune.snapshots(run_dir)
    grid_points = {(r["snapshot"], r["w"]) for r in records if r["seeds"] == [conf.seed_base, 64]}
    assert grid_points == {("base", 0.0)} | {(s, w) for s in snapshots for w in (-1.0, 1.0)}
    best = sweep.best_point(records, conf)
    assert best["fid"] == min(r["fid"] for r in records if r["seeds"] == [conf.seed_base, 64])
    finals = [r for r in records if r["seeds"] == [conf.final_seed_base, 32]]
    assert {(r["snapshot"], r["w"]) for r in finals} == {("base", 0.0), (best["snapshot"], best["w"])}
    # one point by hand: merge, sample the selection seeds with the plain sampler, FD to the truth
    point = next(r for r in records if r["snapshot"] == snapshots[-1] and r["w"] == 1.0)
    model = family.load(base_ckpt)
    merged = merge.extrapolate(
        checkpoint.read(base_ckpt).weights, checkpoint.read(snapshots[-1]).weights, 1.0
    )
    model.net.load_state_dict(merged)
    x = family.sample(model, torch.full((64,), -1), torch.arange(64) + conf.seed_base, ToySampler(zeta=1.0))
    assert point["fid"] == pytest.approx(
        fid.frechet_distance(fid.statistics(x), family.reference()), rel=1e-12
    )
    lines = open(os.path.join(conf.out, sweep.RESULTS)).read().splitlines()
    assert [json.loads(line) for line in lines] == records


def test_sweep_resumes_from_results_and_extends_the_grid(tmp_path, base_ckpt, run_dir):
    _sweep(base_ckpt, run_dir, tmp_path)
    _, again = _sweep(base_ckpt, run_dir, tmp_path)
    assert again == []  # everything cached
    _, more = _sweep(base_ckpt, run_dir, tmp_path, w="-1:1:0.5")
    assert sorted({r["w"] for r in more if r["num"] == 64}) == [-0.5, 0.5]


def test_sweep_errors(tmp_path, base_ckpt, run_dir):
    with pytest.raises(NeonError, match="no snapshots match"):
        _sweep(base_ckpt, str(tmp_path / "nothing-*.pt"), tmp_path)
    with pytest.raises(NeonError, match="final seed ranges .* overlap the selection"):
        sweep.SweepConfig(seed_base=0, num=100, final_seed_base=50, final_num=10)
    with pytest.raises(NeonError, match="no such reference statistics file"):
        _sweep(base_ckpt, run_dir, tmp_path, ref=str(tmp_path / "ref.npz"))
    np.savez(tmp_path / "bad.npz", mean=np.zeros(2))
    with pytest.raises(NeonError, match="lacks mu and sigma"):
        _sweep(base_ckpt, run_dir, tmp_path, ref=str(tmp_path / "bad.npz"))


def test_grid_refuses_huge_grids_before_making_them_and_weights_that_overflow():
    for spec, message in (
        ("0:1:1e-12", "1e\\+12 points, more than 10000"),
        ("0:2e6:1", "at most 1e\\+06"),
        ([3e6], "at most 1e\\+06"),
        (list(range(10_001)), "10001 points"),
        ("0:1e308:1e-308", "at most 1e\\+06"),
        ("0:1:inf", "use start:stop:step"),
    ):
        with pytest.raises(NeonError, match="bad w grid .*" + message):
            search.grid(spec)
    assert len(search.grid("0:9999:1")) == 10_000


# A family whose Fréchet distance is a known convex function of (w, cfg): x = cfg · s · z + b with
# z ~ N(0, I) per seed, scored against N(TARGET, I). The base has b = 0, s = 0.8; the "snapshot"
# b = (-0.5, 0.25), s = 0.9, so θ_neon moves b toward TARGET and s down as w grows, and the FD has a
# diagonal valley over (w, cfg) (the grid optimum at n = 256: w = 2, cfg = 1.6).
TARGET = (1.0, -0.5)
W_GRID, CFG_GRID = "-1:3:0.25", [1.0, 1.2, 1.4, 1.6, 1.8, 2.0]


@dataclasses.dataclass(frozen=True)
class ShiftSampler:
    cfg: float = 1.0


class Shift(torch.nn.Module):
    def __init__(self, b=(0.0, 0.0), s=0.8):
        super().__init__()
        self.b = torch.nn.Parameter(torch.tensor(b))
        self.s = torch.nn.Parameter(torch.tensor([s]))


class ShiftFamily:
    name = "shift"
    Sampler = ShiftSampler
    format = checkpoint.Format(weight_keys=(("model",),))

    def __init__(self, crash_at: int | None = None):
        self.crash_at, self.calls = crash_at, 0

    def tiny(self, seed=0):
        return Model(net=Shift())

    def load(self, path, arch=None, device="cpu", codec=None):
        model = self.tiny()
        model.net.load_state_dict(read_checkpoint(self, path).weights)
        return model

    def sample(self, model, labels, seeds, sampler):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt  # a stand-in for a kill
        z = torch.stack([torch.randn(2, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        with torch.inference_mode():
            return z * sampler.cfg * model.net.s + model.net.b

    def container(self, model, state_dict):
        return {"family": self.name, "model": state_dict}

    def features(self, samples):
        return samples.double()

    def reference(self):
        return np.array(TARGET), np.eye(2)


@pytest.fixture
def shift(tmp_path):
    """(family, base path, snapshot path)."""
    fam = ShiftFamily()
    base, snapshot = str(tmp_path / "base.pt"), str(tmp_path / "run" / "snapshot-0000000100.pt")
    os.makedirs(tmp_path / "run")
    write_checkpoint(fam, Shift().state_dict(), base, like=fam.tiny())
    write_checkpoint(fam, Shift(b=(-0.5, 0.25), s=0.9).state_dict(), snapshot, like=fam.tiny())
    return fam, base, snapshot


def _shift_sweep(shift, out, fam=None, **kw):
    """(conf, new records, summary) of a sweep of the shift family."""
    family_, base, snapshot = shift
    fam = fam or family_
    conf = sweep.SweepConfig(
        **{**dict(self_trained=snapshot, w=W_GRID, num=256, batch_size=64, out=str(out)), **kw}
    )
    records, summary = [], None
    for record in sweep.run(fam, fam.load(base), base, ShiftSampler(), conf):
        if record.info is not None:
            records.append(record.info)
        summary = record.result
    return conf, records, summary


def test_search_and_grid_choose_the_same_point_through_the_sweep(tmp_path, shift):
    _, grid_records, grid = _shift_sweep(shift, tmp_path / "grid", cfg=CFG_GRID)
    assert (grid.w, grid.cfg) == (2.0, 1.6) and len(grid_records) == 17 * 6
    assert grid.selection_images == 17 * 6 * 256 and grid.evidence[0]["points"] == 17 * 6
    _, found, coordinate = _shift_sweep(shift, tmp_path / "coordinate", cfg=CFG_GRID, search="coordinate")
    assert (coordinate.snapshot, coordinate.w, coordinate.cfg) == (
        grid.snapshot,
        2.0,
        1.6,
    ) and coordinate.fid == pytest.approx(grid.fid, rel=1e-9)
    assert coordinate.selection_images == sum(r["num"] for r in found) <= grid.selection_images / 5
    assert [e["n"] for e in coordinate.evidence] == [64, 256] and coordinate.search == "coordinate"
    # w alone: brent at the sampler's cfg (1.0) agrees with the grid's row at cfg 1.0
    _, row, _ = _shift_sweep(shift, tmp_path / "row")
    best_row = min(row, key=lambda r: r["fid"])
    _, _, brent = _shift_sweep(shift, tmp_path / "brent", search="brent")
    assert brent.w == best_row["w"] == 1.75
    # a grid in the search's folder reuses every point the search scored at the full n
    _, more, _ = _shift_sweep(shift, tmp_path / "coordinate", cfg=CFG_GRID)
    full = [r for r in found if r["num"] == 256]
    assert len(more) == 17 * 6 - len(full) and not {sweep.record_key(r) for r in more} & {
        sweep.record_key(r) for r in full
    }


def test_a_search_resumes_mid_search(tmp_path, shift):
    kw = dict(cfg=CFG_GRID, search="coordinate", final_num=64, final_seeds=2)
    _, whole, summary = _shift_sweep(shift, tmp_path / "whole", **kw)
    with pytest.raises(KeyboardInterrupt):
        _shift_sweep(
            shift, tmp_path / "resumed", fam=ShiftFamily(crash_at=12), **kw
        )  # one batch a point: the 12th
    assert len(sweep.load_results(str(tmp_path / "resumed"))) == 11 < len(whole) - 6
    _, rest, resumed = _shift_sweep(shift, tmp_path / "resumed", **kw)
    assert [sweep.record_key(r) for r in rest] == [sweep.record_key(r) for r in whole[11:]]
    done = {sweep.record_key(r): r["fid"] for r in sweep.load_results(str(tmp_path / "resumed"))}
    assert done == {sweep.record_key(r): r["fid"] for r in whole}
    assert resumed == dataclasses.replace(summary, results=str(tmp_path / "resumed" / sweep.RESULTS))


def test_the_sampler_overrides_are_part_of_the_key(tmp_path, shift):
    out = tmp_path / "sweep"
    _, first, _ = _shift_sweep(shift, out, w="0,1")
    assert [r["sampler"] for r in first] == [{}, {}]
    _, other, _ = _shift_sweep(shift, out, w="0,1", sampler={"cfg": 1.5})  # another sampler: scored again
    assert [r["sampler"] for r in other] == [{"cfg": 1.5}] * 2 and other[0]["fid"] != first[0]["fid"]
    _, again, summary = _shift_sweep(shift, out, w="0,1", sampler={"cfg": 1.5})
    assert again == [] and summary.fid == min(r["fid"] for r in other)
    # records written before the overrides were recorded count as none
    path = out / sweep.RESULTS
    lines = [json.loads(line) for line in open(path)]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "sampler"}) + "\n" for r in lines))
    _, none, _ = _shift_sweep(shift, out, w="0,1")
    assert none == []


def test_the_final_report_gives_mean_sd_and_min_over_disjoint_seed_ranges(tmp_path, shift):
    conf, records, summary = _shift_sweep(shift, tmp_path / "sweep", w="0:3:0.5", final_num=128)
    assert conf.final_ranges() == [(2_000_000, 128), (2_000_128, 128), (2_000_256, 128)]
    finals = {}
    for r in records:
        if r["seeds"][0] >= conf.final_seed_base:
            finals.setdefault((r["snapshot"], r["w"]), []).append(r["fid"])
    assert set(finals) == {("base", 0.0), (summary.snapshot, summary.w)} and summary.w == 1.5
    base, best = finals[("base", 0.0)], finals[(summary.snapshot, 1.5)]
    assert len(base) == len(best) == 3 and len(set(base)) == 3  # three different seed ranges
    assert summary.final.base["fid"].mean == pytest.approx(np.mean(base), rel=1e-12)
    assert summary.final.neon["fid"].sd == pytest.approx(np.std(best, ddof=1), rel=1e-9)
    assert summary.final.neon["fid"].min == min(best) and summary.final.images == 6 * 128
    gain, spread = np.mean(base) - np.mean(best), max(np.std(base, ddof=1), np.std(best, ddof=1))
    assert summary.final.gain == pytest.approx(gain) and summary.final.spread == pytest.approx(spread)
    assert summary.final.gain_exceeds_spread is bool(gain > spread) and gain > 0.5 > spread
    for bad, message in (
        (dict(final_seeds=0), "final_seeds must be >= 1"),
        # the third range overlaps
        (dict(seed_base=0, num=100, final_seed_base=-25, final_num=10), "\\[-25, 5\\) overlap"),
        (dict(search="random"), "sweep.search must be one of grid, brent, coordinate"),
        (dict(screen_num=2000), "screen_num must be in \\[2, sweep.num = 1000\\]"),
        (dict(screen_keep=0.0), "sweep.screen_keep must be in"),
    ):
        with pytest.raises(NeonError, match=message):
            sweep.SweepConfig(**bad)
    assert (
        sweep.SweepConfig(search="brent", num=1000).screen() == 250
        and sweep.SweepConfig(num=1000).screen() == 1000
    )


def test_a_point_that_cannot_be_scored_is_written_as_null(tmp_path, shift, monkeypatch):
    real = score.generate_and_score

    def nan_at_w1(family, model, *args, **kwargs):
        result = real(family, model, *args, **kwargs)
        return {**result, "fid": float("nan")} if float(model.net.b[0].detach()) > 0.4 else result

    monkeypatch.setattr(score, "generate_and_score", nan_at_w1)
    _, records, summary = _shift_sweep(shift, tmp_path / "sweep", w="0,0.5,1", search="brent", screen_num=256)
    text = (tmp_path / "sweep" / sweep.RESULTS).read_text()
    assert "NaN" not in text and [r["fid"] is None for r in records] == [False, False, True]
    assert summary.w == 0.5 and json.dumps(summary.to_dict(), allow_nan=False)
