"""The VAR adapter: checkpoint layouts, arch inference, the merge rule for the mask, augmentation."""

import pytest
import torch

from neon import merge
from neon.errors import NeonError
from neon.family import write_checkpoint
from neon.io import checkpoint
from VAR.family import PRESETS, TINY, family, infer_arch
from VAR.loss import augment
from VAR.models import build_vae_var
from VAR.sampler import _draw_tokens

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]


@pytest.mark.parametrize("name", ["d16", "d36"])
def test_arch_is_inferred_from_official_weights(name):
    _, var = build_vae_var("meta", **PRESETS[name])
    assert infer_arch(var.state_dict()) == PRESETS[name]


def test_every_checkpoint_layout_loads(tmp_path):
    model = family.tiny(0)
    codec = str(tmp_path / "vae.pth")
    checkpoint.write(model.codec.state_dict(), codec)
    sd = model.net.state_dict()
    layouts = {
        "ours.pt": None,
        "wrapped.pth": {"var_wo_ddp": sd, "arch": TINY},
        "trainer.pth": {"trainer": {"var_wo_ddp": sd, "epoch": 3}, "arch": TINY},
    }
    write_checkpoint(family, sd, str(tmp_path / "ours.pt"), like=model)
    for name, data in layouts.items():
        if data is not None:
            checkpoint.write(data, str(tmp_path / name))
        loaded = family.load(str(tmp_path / name), codec=codec)
        assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in sd.items()), name
        assert not loaded.net.training and loaded.image_size == 64 and loaded.num_classes == 10
    with pytest.raises(NeonError, match="no VQ-VAE checkpoint at"):
        family.load(str(tmp_path / "ours.pt"), codec=str(tmp_path / "missing.pth"))


def test_merge_keeps_the_mask_and_extrapolates_the_rest(tmp_path):
    base, other = family.tiny(0), family.tiny(1)
    write_checkpoint(family, base.net.state_dict(), str(tmp_path / "base.pt"), like=base)
    write_checkpoint(family, other.net.state_dict(), str(tmp_path / "self.pt"), like=other)
    merge.merge_files(str(tmp_path / "base.pt"), str(tmp_path / "self.pt"), 0.5, str(tmp_path / "neon.pt"))
    merged = checkpoint.read(str(tmp_path / "neon.pt"), family.format)
    mask = base.net.state_dict()["attn_bias_for_masking"]
    assert torch.isinf(mask).any() and torch.equal(merged.weights["attn_bias_for_masking"], mask)
    assert torch.equal(merged.weights["lvl_1L"], base.net.state_dict()["lvl_1L"])
    k = "blocks.0.attn.mat_qkv.weight"
    assert torch.equal(merged.weights[k], 1.5 * base.net.state_dict()[k] - 0.5 * other.net.state_dict()[k])
    assert merged.data["arch"] == TINY


def test_augment_is_lanczos_upscale_then_seeded_crop():
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    a = augment(images, torch.Generator().manual_seed(0))
    b = augment(images, torch.Generator().manual_seed(0))
    assert a.shape == images.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    flat = torch.full((1, 3, 16, 16), 77, dtype=torch.uint8)
    assert torch.equal(augment(flat, torch.Generator().manual_seed(1)), flat)  # Lanczos keeps constants


def test_samples_are_reproducible_and_label_minus_one_is_the_null_class():
    model = family.tiny(0)
    sampler = family.Sampler(cfg=1.5, top_k=20, top_p=0.9)
    seeds = torch.tensor([7, 8, 9])
    batch = family.sample(model, torch.tensor([1, -1, 3]), seeds, sampler)
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == torch.uint8
    assert torch.equal(
        batch, family.sample(model, torch.tensor([1, 10, 3]), seeds, sampler)
    )  # 10 = null class


def _run(var, labels, seeds, **kw):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return list(var.autoregressive_steps(len(seeds), labels, generators=generators, **kw)), generators


def test_each_sample_draws_from_its_own_generator_whatever_the_batch():
    # The draws, bitwise: a row's token draw is a function of its probabilities and its generator alone.
    logits = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    batch = _draw_tokens(logits, [torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    assert torch.equal(batch[1:2], _draw_tokens(logits[1:2], [torch.Generator().manual_seed(8)]))
    # A whole sampling run takes the same number of draws from sample 8's stream, alone or in a batch.
    var = family.tiny(0).net
    kw = dict(cfg=1.5, top_k=20, top_p=0.9)
    _, in_batch = _run(var, torch.tensor([1, -1, 3]), [7, 8, 9], **kw)
    _, alone = _run(var, torch.tensor([-1]), [8], **kw)
    assert torch.equal(in_batch[1].get_state(), alone[0].get_state())
    assert not torch.equal(in_batch[1].get_state(), torch.Generator().manual_seed(8).get_state())


def test_greedy_logits_agree_across_batches_within_tolerance():
    """Across batch compositions the network's outputs agree within float tolerance only (DESIGN.md,
    Determinism); greedy tokens agree wherever the top two logits are not within 1e-3 of a tie."""
    var = family.tiny(0).net
    kw = dict(cfg=1.5, top_k=1, top_p=0.0)
    batch, _ = _run(var, torch.tensor([1, -1, 3]), [7, 8, 9], **kw)
    alone, _ = _run(var, torch.tensor([-1]), [8], **kw)
    for b, a in zip(batch, alone):
        torch.testing.assert_close(b.logits_BlV[1:2], a.logits_BlV, rtol=1e-4, atol=1e-4)
        top2 = a.logits_BlV.topk(2, dim=-1).values
        decided = top2[..., 0] - top2[..., 1] > 1e-3
        assert torch.equal(b.idx_Bl[1:2][decided], a.idx_Bl[decided])
        if not torch.equal(b.idx_Bl[1:2], a.idx_Bl):  # a near tie went the other way: later scales differ
            break


def test_the_fine_tune_tokenizes_in_float32_outside_its_autocast(monkeypatch):
    """Under the fine-tune's bf16 autocast the VQ-VAE still runs in float32, as upstream's trainer
    tokenizes before its autocast block: the codes equal those of a float32 run."""
    model = family.tiny(0)
    samples = family.sample(model, torch.tensor([1, 2]), torch.tensor([3, 4]), family.Sampler())
    labels = torch.tensor([1, 2])
    vae = model.codec
    seen = []
    tokenize = vae.img_to_idxBl

    def spy(img, *args, **kwargs):
        codes = tokenize(img, *args, **kwargs)
        seen.append((img.dtype, torch.is_autocast_enabled("cpu"), codes))
        return codes

    monkeypatch.setattr(vae, "img_to_idxBl", spy)
    family.loss(model, samples, labels, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        family.loss(model, samples, labels, torch.Generator().manual_seed(0))
    (dtype32, autocast32, codes32), (dtype16, autocast16, codes16) = seen
    assert dtype16 == dtype32 == torch.float32 and not autocast16 and not autocast32
    assert all(torch.equal(a, b) for a, b in zip(codes16, codes32))
