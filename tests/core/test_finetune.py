import json
import os

import pytest
import torch

from neon import finetune
from neon.errors import NeonError
from neon.family import read_checkpoint
from neon.io import checkpoint
from neon.toy.family import family
from tests.conftest import Crashing


def _conf(tmp_path, data, name, **kw):
    base = dict(
        data=data,
        out=str(tmp_path / name),
        total_images=96 * 4,
        batch_size=32,
        lr=1e-3,
        snapshot_every_images=96,
        ema_beta=0.9,
        seed=3,
    )
    return finetune.FinetuneConfig(**{**base, **kw})


def _drain(model, conf, fam=family):
    return [record.info for record in finetune.run(fam, model, conf) if record.info is not None]


def test_snapshots_hold_the_ema_as_theta_in_the_family_s_container(tmp_path, base_ckpt, synthetic_set):
    steps = _drain(family.load(base_ckpt), _conf(tmp_path, synthetic_set, "run"))
    assert len(steps) == 12 and steps[-1]["images_seen"] == 384
    names = [os.path.basename(p) for p in finetune.snapshots(str(tmp_path / "run"))]
    assert names == [f"snapshot-{n:010d}.pt" for n in (96, 192, 288, 384)]
    snap = read_checkpoint(family, str(tmp_path / "run" / names[-1]))
    assert sorted(snap.data) == ["arch", "family", "images_seen", "model"] and snap.data["images_seen"] == 384
    assert snap.data["arch"]["model"] == "diffusion" and snap.data["family"] == "toy"
    state = checkpoint.read_state(str(tmp_path / "run" / finetune.STATE))
    base = checkpoint.read(base_ckpt).weights
    assert all(torch.equal(snap.weights[k], state["ema"][k]) for k in base)  # θ_s is the EMA
    moved = max((state["net"][k] - base[k]).abs().max().item() for k in base)
    ema_moved = max((snap.weights[k] - base[k]).abs().max().item() for k in base)
    assert moved > 0 and 0 < ema_moved < moved  # the EMA trails the raw weights
    stats = [json.loads(line) for line in open(tmp_path / "run" / "stats.jsonl")]
    assert [s["images_seen"] for s in stats] == [96, 192, 288, 384]


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, base_ckpt, synthetic_set):
    _drain(family.load(base_ckpt), _conf(tmp_path, synthetic_set, "full"))

    conf = _conf(tmp_path, synthetic_set, "resumed")
    with pytest.raises(KeyboardInterrupt):
        _drain(family.load(base_ckpt), conf, Crashing("loss", 5))  # inside the 2nd snapshot interval
    assert checkpoint.read_state(os.path.join(conf.out, finetune.STATE))["images_seen"] == 96
    resumed = _drain(family.load(base_ckpt), conf)
    assert resumed[0]["images_seen"] == 128  # continued, not restarted
    for name in ("snapshot-0000000384.pt", finetune.STATE):
        a = checkpoint.read_state(str(tmp_path / "full" / name))
        b = checkpoint.read_state(os.path.join(conf.out, name))
        for key in ("model", "ema", "net"):
            if key in a:
                assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), (name, key)


def test_longer_run_extends_and_other_settings_are_refused(tmp_path, base_ckpt, synthetic_set):
    conf = _conf(tmp_path, synthetic_set, "run", total_images=192)
    _drain(family.load(base_ckpt), conf)
    longer = _conf(tmp_path, synthetic_set, "run", total_images=288)
    assert [s["images_seen"] for s in _drain(family.load(base_ckpt), longer)] == [224, 256, 288]
    with pytest.raises(NeonError, match=r"holds a fine-tune with other settings \(lr\)"):
        _drain(family.load(base_ckpt), _conf(tmp_path, synthetic_set, "run", total_images=384, lr=1e-4))


def test_lengths_need_not_divide_the_batch(tmp_path, base_ckpt, synthetic_set):
    """EDM's ticks: stop at the first step reaching total_images, snapshot at each crossing."""
    conf = _conf(tmp_path, synthetic_set, "ticks", total_images=150, snapshot_every_images=50)
    steps = _drain(family.load(base_ckpt), conf)
    assert [s["images_seen"] for s in steps] == [32, 64, 96, 128, 160]
    assert [s["images_seen"] for s in steps if s["snapshot"]] == [64, 128, 160]
    assert [os.path.basename(p) for p in finetune.snapshots(conf.out)] == [
        "snapshot-0000000064.pt",
        "snapshot-0000000128.pt",
        "snapshot-0000000160.pt",
    ]


def test_lr_ramp_is_linear_in_images(tmp_path, base_ckpt, synthetic_set):
    conf = _conf(tmp_path, synthetic_set, "ramp", total_images=192, ramp_images=128)
    lrs = [s["lr"] for s in _drain(family.load(base_ckpt), conf)]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_runs_on_cpu(tmp_path, base_ckpt, synthetic_set, precision):
    steps = _drain(
        family.load(base_ckpt),
        _conf(
            tmp_path,
            synthetic_set,
            precision,
            total_images=64,
            snapshot_every_images=None,
            precision=precision,
        ),
    )
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)


def test_wrong_family_data_is_refused(tmp_path, base_ckpt, synthetic_set):
    class Other:
        name = "edm"

        def __getattr__(self, name):
            return getattr(family, name)

    with pytest.raises(NeonError, match="was drawn from family 'toy', not 'edm'"):
        list(finetune.run(Other(), family.load(base_ckpt), _conf(tmp_path, synthetic_set, "x")))
