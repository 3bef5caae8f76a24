import json
import os

import numpy as np
import pytest
import torch

from neon import finetune, merge, sweep, checkpoint
from neon.errors import NeonError
from neon.metrics import fid
from neon.toy.family import ToySampler, family


def test_grid_parsing():
    assert sweep.grid("0:2:0.5") == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert sweep.grid("-1:1:0.125")[:3] == [-1.0, -0.875, -0.75] and len(sweep.grid("-1:1:0.125")) == 17
    assert sweep.grid("0,0.3") == [0.0, 0.3] and sweep.grid([1, 2]) == [1.0, 2.0] and sweep.grid(0.5) == [0.5]
    for bad in ("0:2", "2:0:1", "a,b", "0:1:0", [float("nan")]):
        with pytest.raises(NeonError, match="bad w grid"):
            sweep.grid(bad)


def test_frechet_distance_matches_the_closed_form():
    # diagonal covariances: FD = |mu_a - mu_b|^2 + sum (sqrt(a) - sqrt(b))^2
    a = (np.array([1.0, 0.0]), np.diag([4.0, 1.0]))
    b = (np.array([0.0, 2.0]), np.diag([1.0, 9.0]))
    assert fid.frechet_distance(a, b) == pytest.approx(5.0 + 1.0 + 4.0, rel=1e-12)
    x = torch.randn(1000, 2, dtype=torch.float64)
    mu, sigma = fid.statistics(x)
    assert np.allclose(sigma, np.cov(x.numpy().T)) and fid.frechet_distance((mu, sigma), (mu, sigma)) < 1e-10


@pytest.fixture
def run_dir(tmp_path, base_ckpt, synthetic_set):
    conf = finetune.FinetuneConfig(data=synthetic_set, out=str(tmp_path / "run"), total_images=192, batch_size=32,
                                   lr=1e-3, snapshot_every_images=96)
    for _ in finetune.run(family, family.load(base_ckpt), conf, "toy"):
        pass
    return conf.out


def _sweep(base_ckpt, run_dir, tmp_path, **kw):
    conf = sweep.SweepConfig(**{**dict(self_trained=run_dir, w="-1:1:1", num=64, batch_size=16, final_num=32,
                                       out=str(tmp_path / "sweep"), sampler={"zeta": 1.0}), **kw})
    return conf, list(sweep.run(family, family.load(base_ckpt), base_ckpt, ToySampler(zeta=1.1), conf))


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
    merged = merge.extrapolate(checkpoint.read(base_ckpt).weights, checkpoint.read(snapshots[-1]).weights, 1.0)
    model.net.load_state_dict(merged)
    x = family.sample(model, torch.full((64,), -1), torch.arange(64) + conf.seed_base, ToySampler(zeta=1.0))
    assert point["fid"] == pytest.approx(fid.frechet_distance(fid.statistics(x), family.reference()), rel=1e-12)
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
    with pytest.raises(NeonError, match="final seed range overlaps"):
        sweep.SweepConfig(seed_base=0, num=100, final_seed_base=50, final_num=10)
    with pytest.raises(NeonError, match="no such reference statistics file"):
        _sweep(base_ckpt, run_dir, tmp_path, ref=str(tmp_path / "ref.npz"))
    np.savez(tmp_path / "bad.npz", mean=np.zeros(2))
    with pytest.raises(NeonError, match="lacks mu and sigma"):
        _sweep(base_ckpt, run_dir, tmp_path, ref=str(tmp_path / "bad.npz"))
