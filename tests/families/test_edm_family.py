"""The EDM adapter: network pickles read safely, the Neon loop on a tiny EDM, balanced labels."""

import json
import os
import pickle
import sys
import types

import pytest
import torch

from edm import networks
from edm.family import DEFAULT_AUGMENT, TINY, family
from neon import merge, synthetic
from neon.errors import NeonError
from neon.family import write_checkpoint
from neon.io import checkpoint

pytestmark = pytest.mark.numerics

MARKER = "pickle-code-ran"


def _write_edm_pickle(path, model, monkeypatch, marker_dir):
    """Write `model` the way NVlabs' training loop does: {'ema', 'loss_fn', 'augment_pipe',
    'dataset_kwargs'}, every network object as torch_utils.persistence._reconstruct_persistent_obj(meta)
    whose meta carries module source that would create a marker file if anyone executed it."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # only its name is pickled
        raise AssertionError

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", persistence)
    source = f"open({os.path.join(str(marker_dir), MARKER)!r}, 'w').write('ran')\n"

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, torch.nn.Module) and type(obj).__module__ == networks.__name__:
                state = dict(obj.__dict__)
                state["_init_kwargs"] = dict(obj._test_kwargs) if hasattr(obj, "_test_kwargs") else {}
                state.pop("_test_kwargs", None)
                meta = {
                    "type": "class",
                    "version": 6,
                    "module_src": source,
                    "class_name": type(obj).__name__,
                    "state": state,
                }
                return _reconstruct_persistent_obj, (meta,)
            return NotImplemented

    kwargs = {k: v for k, v in model.arch.items() if k != "class_name"}
    model.net._test_kwargs = kwargs
    with open(path, "wb") as f:
        Pickler(f, protocol=4).dump(
            {"ema": model.net, "loss_fn": None, "augment_pipe": None, "dataset_kwargs": {"use_labels": True}}
        )
    del model.net._test_kwargs


def test_network_pickle_loads_without_running_its_code(tmp_path, monkeypatch):
    model = family.tiny(0)
    path = tmp_path / "edm-tiny.pkl"
    _write_edm_pickle(path, model, monkeypatch, tmp_path)
    monkeypatch.delitem(sys.modules, "torch_utils.persistence")
    monkeypatch.delitem(sys.modules, "torch_utils")
    container = checkpoint.read(str(path), family.format)
    assert container.weights_key == ("ema",) and container.data["dataset_kwargs"] == {"use_labels": True}
    assert container.data["arch"] == {**TINY, "class_name": "EDMPrecond"}
    expected = model.net.state_dict()
    assert list(container.weights) == list(expected)
    assert all(torch.equal(container.weights[k], v) for k, v in expected.items())
    loaded = family.load(str(path))
    images = family.sample(loaded, torch.tensor([3, 7]), torch.tensor([0, 1]), family.Sampler(num_steps=2))
    assert torch.equal(
        images, family.sample(model, torch.tensor([3, 7]), torch.tensor([0, 1]), family.Sampler(num_steps=2))
    )
    assert not (tmp_path / MARKER).exists()


class _Evil:
    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


@pytest.mark.parametrize("payload", [{"ema": _Evil()}, _Evil(), {"ema": {"x": 1}, "loss_fn": _Evil()}])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, payload, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(NeonError, match=r"refused posix.system: not on the allowlist"):
        checkpoint.read(str(path), family.format)
    assert not (tmp_path / MARKER).exists()


def test_merging_a_pickled_base_writes_plain_data_every_loader_reads(tmp_path, monkeypatch):
    model = family.tiny(0)
    base = tmp_path / "base.pkl"
    _write_edm_pickle(base, model, monkeypatch, tmp_path)
    other = family.tiny(1)
    write_checkpoint(family, other.net.state_dict(), str(tmp_path / "self.pt"), like=other)
    merge.merge_files(str(base), str(tmp_path / "self.pt"), 0.5, str(tmp_path / "neon.pt"))
    merged = checkpoint.read(str(tmp_path / "neon.pt"), family.format)
    assert (
        merged.format == "pt"
        and merged.weights_key == ("ema",)
        and merged.data["arch"]["class_name"] == "EDMPrecond"
    )
    k = "model.enc.8x8_conv.weight"
    assert torch.equal(merged.weights[k], 1.5 * model.net.state_dict()[k] - 0.5 * other.net.state_dict()[k])
    assert family.load(str(tmp_path / "neon.pt")).num_classes == 10


def test_conditional_synthetic_set_has_balanced_labels(tmp_path):
    model = family.tiny(0)
    conf = synthetic.SyntheticConfig(out=str(tmp_path / "S"), num=23, batch_size=8, shard_size=10)
    for _ in synthetic.write(family, model, family.Sampler(num_steps=2), conf, "sha"):
        pass
    data = synthetic.read(conf.out)
    counts = torch.bincount(data.labels, minlength=10)
    samples = data.read(range(len(data)))
    assert samples.shape == (23, 3, 8, 8) and samples.dtype == torch.uint8
    assert counts.min() == 2 and counts.max() == 3 and counts.sum() == 23
    manifest = json.load(open(os.path.join(conf.out, "manifest.json")))
    assert manifest["num_classes"] == 10 and manifest["sampler"]["num_steps"] == 2


def test_sample_matches_upstream_generate_stream(tmp_path):
    """generate.py: per-seed generator draws latents, then the class index, then the churn noise."""
    from edm.sampler import edm_sampler

    model = family.tiny(0)
    sampler = family.Sampler(num_steps=3, S_churn=10, S_max=100)
    ours = family.sample(model, torch.tensor([4]), torch.tensor([5]), sampler)
    g = torch.Generator().manual_seed(5)
    latents = torch.randn([1, 3, 8, 8], generator=g)
    torch.randint(10, size=[1], generator=g)

    def randn_like(x):
        return torch.randn(x.shape[1:], generator=g, dtype=x.dtype)[None]

    with torch.no_grad():
        x = edm_sampler(
            model.net, latents, torch.eye(10)[[4]], randn_like=randn_like, num_steps=3, S_churn=10, S_max=100
        )
    assert torch.equal(ours, (x * 127.5 + 128).clip(0, 255).to(torch.uint8))


def test_loss_is_edm_objective_and_labels_are_checked():
    model = family.tiny(0)
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    model.net.train()
    loss = family.loss(model, images, torch.tensor([1, 2]), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(NeonError, match=r"class labels must be in \[0, 10\)"):
        family.loss(model, images, torch.tensor([-1, 2]), torch.Generator().manual_seed(0))


def test_the_augment_pipe_of_the_base_survives_finetune_and_merge(tmp_path):
    from neon import finetune
    from neon.family import read_checkpoint

    model = family.tiny(0)
    pipe = {**DEFAULT_AUGMENT, "p": 0.3}  # not the default p: it must come from the base
    base = str(tmp_path / "base.pt")
    checkpoint.write({"ema": model.net.state_dict(), "arch": model.arch, "augment_pipe": pipe}, base)
    conf = synthetic.SyntheticConfig(out=str(tmp_path / "S"), num=8, batch_size=8, shard_size=8)
    for _ in synthetic.write(family, family.load(base), family.Sampler(num_steps=2), conf, "sha"):
        pass
    run = finetune.FinetuneConfig(
        data=conf.out, out=str(tmp_path / "run"), total_images=8, batch_size=8, lr=1e-4
    )
    for _ in finetune.run(family, family.load(base), run):
        pass
    snapshot = read_checkpoint(family, str(tmp_path / "run" / "snapshot-0000000008.pt"))
    assert snapshot.weights_key == ("ema",) and snapshot.data["augment_pipe"] == pipe
    merge.merge_files(base, snapshot.path, 0.5, str(tmp_path / "neon.pt"), family=family)
    assert family.load(str(tmp_path / "neon.pt")).extras["augment_pipe"] == pipe
    assert family.load(snapshot.path).extras["augment_pipe"] == pipe


def test_a_base_that_stores_no_augment_pipe_fine_tunes_without_one(tmp_path, monkeypatch):
    """EDM's --augment=0 pickles (ImageNet-64) store augment_pipe None: no augmentation, not the default
    pipe. Only a file without the entry falls back, by its network's augment_dim."""
    model = family.tiny(0)
    pickled = tmp_path / "noaug.pkl"
    _write_edm_pickle(pickled, model, monkeypatch, tmp_path)
    assert family.load(str(pickled)).extras["augment_pipe"] is None
    cases = {
        "none.pt": {"augment_pipe": None},
        "own.pt": {"augment_pipe": {**DEFAULT_AUGMENT, "p": 0.5}},
        "absent.pt": {},
    }
    for name, extra in cases.items():
        checkpoint.write({"ema": model.net.state_dict(), "arch": model.arch, **extra}, str(tmp_path / name))
    assert family.load(str(tmp_path / "none.pt")).extras["augment_pipe"] is None
    assert family.load(str(tmp_path / "own.pt")).extras["augment_pipe"]["p"] == 0.5
    assert model.arch["augment_dim"] == 9
    assert family.load(str(tmp_path / "absent.pt")).extras["augment_pipe"] == DEFAULT_AUGMENT
    plain = {**model.arch, "augment_dim": 0}
    net = networks.EDMPrecond(**{k: v for k, v in plain.items() if k != "class_name"})
    checkpoint.write({"ema": net.state_dict(), "arch": plain}, str(tmp_path / "absent0.pt"))
    assert family.load(str(tmp_path / "absent0.pt")).extras["augment_pipe"] is None
    checkpoint.write(
        {"ema": model.net.state_dict(), "arch": model.arch, "augment_pipe": 0.12}, str(tmp_path / "bad.pt")
    )
    with pytest.raises(NeonError, match="augment_pipe must be AugmentPipe's arguments or None, got float"):
        family.load(str(tmp_path / "bad.pt"))
