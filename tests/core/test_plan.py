"""`neon plan`: the fake-tensor memory of a fine-tune step against a real one, the images and disk
against hand-computed values, the not-fit advice and the --json keys."""

import json
import os

import pytest
import torch

from neon import cli, config, plan
from neon import family as registry
from neon.recipe import build_recipe

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs")
GIB = 2**30


def _recipe(name: str, **changes):
    raw = config.load_yaml(os.path.join(CONFIGS, name))
    for key, value in changes.items():
        config.set_dotted(raw, key, value, parse=False)
    return build_recipe(raw)


@pytest.mark.parametrize("family_name, precision", [("var", "fp32"), ("edm", "fp32"), ("var", "bf16")])
def test_fake_fine_tune_memory_matches_a_real_step(family_name, precision):
    """The plan's peak (fake tensors, AdamW's allocations replayed) within 15% of the same step run on
    real CPU tensors with torch's AdamW, under the same live-bytes tracker."""
    fam = registry.get(family_name)
    recipe = _recipe(
        "VAR/d16_in256.yaml" if family_name == "var" else "edm/cifar10_cond.yaml",
        **{
            "finetune.batch_size": 8,
            "finetune.precision": precision,
            "synthetic.batch_size": 4,
            "sweep.batch_size": 4,
            **({} if family_name == "var" else {"sampler.num_steps": 2}),
        },
    )
    result = plan.plan(recipe, gpus=1, model=fam.tiny(0))
    torch.manual_seed(0)
    real = plan.measure_finetune(
        fam, fam.tiny(0), 8, precision, recipe.finetune.has_ema, torch.device("cpu"), real_optimizer=True
    )
    assert result["finetune_peak_gib"] * GIB == pytest.approx(real.peak, rel=0.15)
    assert result["finetune_fits"] is True and "advice" not in result


def test_images_and_disk_against_hand_computed_values():
    fam = registry.get("var")
    tiny = fam.tiny(0)
    result = plan.plan(
        _recipe(
            "VAR/d16_in256.yaml",
            **{
                "synthetic.batch_size": 4,
                "sweep.batch_size": 4,
                "sweep.search": "grid",
                "sweep.refine": None,
            },
        ),
        gpus=8,
        model=tiny,
    )
    size = tiny.image_size
    params = sum(p.numel() for p in tiny.net.parameters())
    theta = sum(t.numel() * t.element_size() for t in tiny.net.state_dict().values())
    assert result["synthetic_images"] == 750_000
    assert result["synthetic_disk_gb"] == pytest.approx(750_000 * (3 * size * size + 16) / 1e9)
    # 9,766 steps of 768 images (7,500,288); a snapshot at each of the 30 multiples of 250k crossed,
    # the last of them at the end
    assert result["finetune_images"] == 9766 * 768
    assert result["snapshots"] == 30
    assert result["snapshots_disk_gb"] == pytest.approx(30 * theta / 1e9)
    assert result["state_disk_gb"] == pytest.approx((theta + 2 * params * 4) / 1e9)  # θ + Adam's moments
    # grid: the base at 14 cfg values + 30 snapshots × 10 w × 14 cfg, 10k images each
    assert result["selection_images"] == (14 + 30 * 10 * 14) * 10_000
    assert result["final_images"] == 2 * 3 * 50_000
    assert result["finetune_share_of_base"] == pytest.approx(9766 * 768 / 256_233_400)
    # the recipe's own strategy (coordinate + halving + refine): at most 1/5 of the grid's images
    own = plan.selection_bound(_recipe("VAR/d16_in256.yaml").sweep, 30)
    assert own == 5_250_000 and own <= result["selection_images"] / 5


def test_a_fine_tune_that_does_not_fit_names_what_would():
    fam = registry.get("edm")
    recipe = _recipe(
        "edm/cifar10_cond.yaml",
        **{
            "finetune.batch_size": 8,
            "synthetic.batch_size": 4,
            "sweep.batch_size": 4,
            "sampler.num_steps": 2,
        },
    )
    fits = plan.plan(recipe, gpus=1, model=fam.tiny(0))
    static, peak = fits["finetune_static_gib"], fits["finetune_peak_gib"]
    tight = static + 0.6 * (peak - static)  # half the batch fits, the whole one does not
    result = plan.plan(recipe, gpus=1, gpu_memory=tight, model=fam.tiny(0))
    assert result["finetune_fits"] is False
    assert result["advice"].startswith("finetune.accumulate 2 (per-GPU micro-batch 4")
    table = plan.table(result)
    assert "DOES NOT FIT" in table and "try finetune.accumulate 2" in table


def test_json_holds_the_keys_other_checks_read(capsys):
    cli.main(["plan", os.path.join(CONFIGS, "toy", "diffusion_zeta1.1.yaml"), "--gpus", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    for key in (
        "finetune_peak_gib",
        "sample_peak_gib",
        "synthetic_disk_gb",
        "snapshots_disk_gb",
        "selection_images",
        "finetune_images",
        "gpu_hours",
    ):
        assert isinstance(result[key], (int, float)), key
    assert result["selection_images"] == (1 + 5 * 16) * 50_000  # 5 snapshots × 16 w (0 is the base)
    assert result["synthetic_disk_gb"] == pytest.approx(1000 * (2 * 4 + 16) / 1e9)
