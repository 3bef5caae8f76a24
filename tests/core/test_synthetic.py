import json
import os

import numpy as np
import pytest
import torch

from neon import synthetic
from neon.errors import NeonError
from neon.io import rows
from neon.toy.family import ToySampler, family
from tests.conftest import Crashing

pytestmark = pytest.mark.numerics


def _files(directory):
    return {
        name: open(os.path.join(directory, name), "rb").read()
        for name in sorted(os.listdir(directory))
        if name.startswith("shard-")
    }


def test_balanced_labels_counts_and_determinism():
    labels = synthetic.balanced_labels(1003, 10, seed=5)
    counts = torch.bincount(labels, minlength=10)
    assert counts.sum() == 1003 and counts.min() == 100 and counts.max() == 101 and (counts == 101).sum() == 3
    assert torch.equal(labels, synthetic.balanced_labels(1003, 10, seed=5))
    assert not torch.equal(labels, synthetic.balanced_labels(1003, 10, seed=6))
    assert torch.equal(synthetic.balanced_labels(4, 0, seed=1), torch.full((4,), -1))


def test_set_layout_manifest_and_contents(synthetic_set, base_ckpt):
    manifest = json.load(open(os.path.join(synthetic_set, "manifest.json")))
    assert manifest["num"] == 96 and manifest["sample_shape"] == [2] and len(manifest["shards"]) == 4
    assert manifest["sampler"] == {"zeta": 1.1, "steps": 20, "eta": 0.0, "method": "ddim", "tau": 1.0}
    data = synthetic.read(synthetic_set)
    samples = data.read(range(len(data)))
    assert samples.shape == (96, 2) and samples.dtype == torch.float32
    assert torch.equal(data.seeds, torch.arange(96)) and torch.equal(data.labels, torch.full((96,), -1))
    # Sample i depends only on its seed: its draws bitwise (the toy's noise is `neon.rng`, tested in
    # tests/core/test_rng.py), its value within float tolerance, since the network's kernels block a
    # batch of 3 differently from the batch of 16 it was drawn in (DESIGN.md, Determinism).
    model = family.load(base_ckpt)
    again = family.sample(model, torch.full((3,), -1), torch.tensor([5, 50, 95]), ToySampler(zeta=1.1))
    torch.testing.assert_close(again, data.read([5, 50, 95]), rtol=1e-5, atol=1e-5)


def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, base_ckpt, synthetic_set):
    conf = synthetic.SyntheticConfig(
        out=str(tmp_path / "resumed"), num=96, batch_size=16, shard_size=24, labels="none"
    )
    model = family.load(base_ckpt)
    with pytest.raises(KeyboardInterrupt):
        for _ in synthetic.write(Crashing("sample", 6), model, ToySampler(zeta=1.1), conf, "sha"):
            pass
    manifest = json.load(open(os.path.join(conf.out, "manifest.json")))
    assert sorted(manifest["shards"]) == ["shard-00000.npz", "shard-00001.npz"]
    assert not [n for n in os.listdir(conf.out) if n.endswith(".tmp.npz") or ".tmp" in n]
    with pytest.raises(NeonError, match="incomplete \\(2 of 4 shards\\)"):
        synthetic.read(conf.out)
    progress = list(synthetic.write(family, model, ToySampler(zeta=1.1), conf, "sha"))
    assert [p.done for p in progress] == [48, 72, 96]  # resumed with 2 shards done
    assert progress[-1].result == conf.out and all(p.result is None for p in progress[:-1])
    assert _files(conf.out) == _files(synthetic_set)


def test_other_settings_in_the_same_directory_are_refused(synthetic_set, base_ckpt):
    conf = synthetic.SyntheticConfig(out=synthetic_set, num=96, batch_size=16, shard_size=24, labels="none")
    with pytest.raises(NeonError, match=r"holds a synthetic set with sampler=.*zeta': 1.1"):
        next(synthetic.write(family, family.load(base_ckpt), ToySampler(zeta=0.9), conf, "sha"))


def test_corrupt_shard_is_detected(synthetic_set):
    path = os.path.join(synthetic_set, "shard-00001.npz")
    with np.load(path) as shard:
        arrays = dict(shard)
    arrays["samples"][0, 0] += 1
    np.savez(path, **arrays)
    with pytest.raises(NeonError, match="shard-00001.npz does not match the sha256"):
        synthetic.read(synthetic_set)


def test_missing_set_is_a_clear_error(tmp_path):
    with pytest.raises(NeonError, match="is not a synthetic set"):
        synthetic.read(str(tmp_path))


def test_export_png_refuses_points(synthetic_set, tmp_path):
    with pytest.raises(NeonError, match="holds toy samples, not images"):
        synthetic.export_png(synthetic_set, str(tmp_path / "png"))


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_members_are_read_row_by_row_as_numpy_reads_them(tmp_path, save):
    array = np.arange(7 * 4 * 3, dtype=np.float32).reshape(7, 4, 3)
    path = str(tmp_path / "a.npz")
    save(path, samples=array, labels=np.arange(7))
    member = rows.npz_array(path, "samples")
    assert isinstance(member, rows.RowFile) == (save is np.savez)  # compressed members are read whole
    assert member.shape == (7, 4, 3) and member.dtype == np.float32 and len(member) == 7
    for index in (slice(2, 5), slice(0, 7, 3), [6, 0, 6], np.array([3, 4, 5]), 4):
        np.testing.assert_array_equal(member[index], array[index])
    with pytest.raises(NeonError, match="has no array 'images'"):
        rows.npz_array(path, "images")


def test_the_reader_reads_any_rows_in_any_order_across_shards(synthetic_set):
    data = synthetic.read(synthetic_set)
    whole = data.read(range(len(data)))
    index = torch.tensor([95, 0, 24, 23, 23, 71])  # shards 3, 0, 1, 0, 0, 2
    assert torch.equal(data.read(index), whole[index])
    with pytest.raises(NeonError, match=r"sample index out of range \[0, 96\)"):
        data.read([96])
