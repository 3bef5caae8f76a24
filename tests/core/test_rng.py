"""`neon.rng`: row i of every draw depends on seed i alone, bitwise, whatever the batch (DESIGN.md,
Determinism), and the toy family draws all its sampling noise through it."""

import pytest
import torch

from neon import rng
from neon.toy import models
from neon.toy.family import ToySampler, family

pytestmark = pytest.mark.numerics


def test_rows_depend_on_their_seed_and_stream_alone():
    seeds = torch.tensor([5, 2**40 + 3, 5, 7])
    for shape in ((2,), (3, 5), (7,)):
        batch = rng.normal(seeds, shape, stream=4)
        alone = rng.normal(seeds[1:2], shape, stream=4)
        assert (
            batch.shape == (4, *shape) and torch.equal(batch[1:2], alone) and torch.equal(batch[0], batch[2])
        )
        assert not torch.equal(batch[0], batch[3]) and not torch.equal(
            alone, rng.normal(seeds[1:2], shape, stream=5)
        )
    u = rng.uniform(seeds, 1000)
    assert torch.equal(u[3:], rng.uniform(seeds[3:], 1000)) and 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.02


def test_standard_normal_moments():
    z = rng.normal(torch.arange(4000), (50,), dtype=torch.float64)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01


def test_toy_samplers_draw_each_sample_s_noise_from_its_seed_whatever_the_batch(monkeypatch):
    calls = []
    real_normal = rng.normal

    def recording(seeds, shape, stream=0, dtype=torch.float32):
        out = real_normal(seeds, shape, stream, dtype)
        calls.append((stream, {int(s): row for s, row in zip(seeds, out)}))
        return out

    monkeypatch.setattr(rng, "normal", recording)
    for kind, sampler in (("diffusion", ToySampler(eta=1.0, steps=5)), ("ar", ToySampler(tau=0.5))):
        model = family.tiny(0, kind)
        calls.clear()
        family.sample(model, torch.full((3,), -1), torch.tensor([4, 50, 9]), sampler)
        in_batch = [(stream, rows[50]) for stream, rows in calls]
        calls.clear()
        family.sample(model, torch.full((1,), -1), torch.tensor([50]), sampler)
        alone = [(stream, rows[50]) for stream, rows in calls]
        assert len(alone) == len(in_batch) > 0 and models.rng is rng
        assert all(s == t and torch.equal(a, b) for (s, a), (t, b) in zip(in_batch, alone)), kind
