"""The VAR adapter: checkpoint layouts, arch inference, the merge rule for the mask, augmentation."""

import pytest
import torch

from neon import checkpoint, merge
from neon.errors import NeonError
from VAR.family import PRESETS, TINY, augment, family, infer_arch
from VAR.models import build_vae_var


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["d16", "d36"])
def test_arch_is_inferred_from_official_weights(name):
    _, var = build_vae_var("meta", **PRESETS[name])
    assert infer_arch(var.state_dict()) == PRESETS[name]


def test_every_checkpoint_layout_loads(tmp_path):
    model = family.tiny(0)
    codec = str(tmp_path / "vae.pth")
    checkpoint.write(model.codec.state_dict(), codec)
    sd = model.net.state_dict()
    layouts = {"ours.pt": None, "wrapped.pth": {"var_wo_ddp": sd, "arch": TINY},
               "trainer.pth": {"trainer": {"var_wo_ddp": sd, "epoch": 3}, "arch": TINY}}
    family.save(sd, str(tmp_path / "ours.pt"), like=model)
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
    family.save(base.net.state_dict(), str(tmp_path / "base.pt"), like=base)
    family.save(other.net.state_dict(), str(tmp_path / "self.pt"), like=other)
    merge.merge_files(str(tmp_path / "base.pt"), str(tmp_path / "self.pt"), 0.5, str(tmp_path / "neon.pt"))
    merged = checkpoint.read(str(tmp_path / "neon.pt"))
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


def test_samples_per_seed_and_null_class_labels():
    model = family.tiny(0)
    sampler = family.Sampler(cfg=1.5, top_k=20, top_p=0.9)
    batch = family.sample(model, torch.tensor([1, -1, 3]), torch.tensor([7, 8, 9]), sampler)
    alone = family.sample(model, torch.tensor([-1]), torch.tensor([8]), sampler)
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == torch.uint8 and torch.equal(batch[1:2], alone)
