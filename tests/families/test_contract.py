"""Every registered family against the Family protocol, on its tiny() model."""

import dataclasses

import pytest
import torch

from neon import family as registry
from neon import checkpoint
from neon.metrics import inception


@pytest.fixture(params=sorted(registry.REGISTRY))
def fam(request, inception_file, one_thread):
    # image families score with Inception features: a random-weight network the tests build
    inception.configure(inception.FidConfig(inception_weights=inception_file, batch_size=8))
    yield registry.get(request.param)
    inception.configure(inception.FidConfig())


def _labels(model, n):
    return torch.arange(n) % model.num_classes if model.num_classes else torch.full((n,), -1)


def test_sample_is_deterministic_per_seed_whatever_the_batch(fam):
    model = fam.tiny(0)
    sampler = fam.Sampler()
    labels = torch.zeros(4, dtype=torch.int64) if model.num_classes else torch.full((4,), -1)  # same label: seeds decide
    seeds = torch.tensor([3, 1, 4, 1])
    batch = fam.sample(model, labels, seeds, sampler)
    alone = fam.sample(model, labels[2:3], seeds[2:3], sampler)
    assert torch.equal(batch[2:3], alone) and torch.equal(batch[1], batch[3]) and not torch.equal(batch[0], batch[1])
    if batch.ndim == 4:
        assert batch.dtype == torch.uint8 and batch.shape[1] == 3
    assert not torch.is_inference_mode_enabled()


def test_loss_is_a_finite_scalar_with_gradients(fam):
    model = fam.tiny(0)
    net = fam.trainable(model)
    assert net is model.net
    samples = fam.sample(model, _labels(model, 8), torch.arange(8), fam.Sampler())
    net.train().requires_grad_(True)
    loss = fam.loss(model, samples, _labels(model, 8), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_save_load_round_trip_and_weights_keys(fam, tmp_path):
    model = fam.tiny(1)
    path = str(tmp_path / "model.pt")
    fam.save(model.net.state_dict(), path, like=model)
    container = checkpoint.read(path)
    weights = fam.weights(container)
    assert set(weights) == set(fam.trainable(model).state_dict())
    codec = None
    if model.codec is not None:  # e.g. VAR keeps its VQ-VAE in a file of its own
        codec = str(tmp_path / "codec.pt")
        checkpoint.write(model.codec.state_dict(), codec)
    loaded = fam.load(path, None, "cpu", codec=codec)
    assert not loaded.net.training and all(not p.requires_grad for p in loaded.net.parameters())
    for k, v in model.net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[k], v)
    fam.save(weights, str(tmp_path / "again.pt"), like=container)
    assert checkpoint.read(str(tmp_path / "again.pt")).data.keys() == container.data.keys()


def test_sampler_is_a_frozen_dataclass_and_features_are_float64(fam):
    sampler = fam.Sampler()
    assert dataclasses.is_dataclass(sampler)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sampler.steps = 1
    model = fam.tiny(0)
    features = fam.features(fam.sample(model, _labels(model, 5), torch.arange(5), sampler))
    assert features.dtype == torch.float64 and features.shape[0] == 5
