import glob
import os

import pytest
import yaml

from neon import cli, config
from neon.errors import NeonError
from neon.finetune import FinetuneConfig
from neon.recipe import build_recipe
from tests.conftest import REPO


def test_dotted_overrides_are_parsed_as_yaml_scalars():
    raw = {"finetune": {"lr": 1e-5}}
    config.set_dotted(raw, "finetune.lr", "3e-4")
    config.set_dotted(raw, "sampler.zeta", "1.1")
    config.set_dotted(raw, "sweep.cfg", "[1.5, 2]")
    config.set_dotted(raw, "sweep.w", "0:2:0.25")  # YAML 1.1 would read base 60: 120.25
    config.set_dotted(raw, "sweep.out", "1e-5", parse=False)
    assert raw == {
        "finetune": {"lr": 3e-4},
        "sampler": {"zeta": 1.1},
        "sweep": {"cfg": [1.5, 2], "w": "0:2:0.25", "out": "1e-5"},
    }
    assert config.parse_yaml("a: 1e-5\nb: 0:1:0.5\nc: 12\nd: .inf\ne: 1_000") == {
        "a": 1e-5,
        "b": "0:1:0.5",
        "c": 12,
        "d": float("inf"),
        "e": "1_000",
    }


def test_build_checks_types_and_coerces_numbers():
    conf = config.build(
        FinetuneConfig, {"total_images": "1e3", "batch_size": 10, "lr": 1, "betas": [0.9, 0.95]}, "finetune"
    )
    assert conf.total_images == 1000 and isinstance(conf.lr, float) and conf.betas == (0.9, 0.95)
    with pytest.raises(NeonError, match="finetune.batch_size: expected int, got 'many'"):
        config.build(FinetuneConfig, {"total_images": 10, "batch_size": "many"}, "finetune")
    with pytest.raises(NeonError, match="finetune.total_images: expected int, got 1.5"):
        config.build(FinetuneConfig, {"total_images": 1.5}, "finetune")
    with pytest.raises(NeonError, match=r"unknown key finetune.learning_rate \(known: data, out"):
        config.build(FinetuneConfig, {"learning_rate": 1e-4}, "finetune")


def test_post_init_rejects_bad_combinations():
    with pytest.raises(NeonError, match="snapshot_every_images must be positive"):
        FinetuneConfig(total_images=100, batch_size=64, snapshot_every_images=0)
    with pytest.raises(NeonError, match="ema_beta or finetune.ema_halflife_images, not both"):
        FinetuneConfig(total_images=64, batch_size=64, ema_beta=0.9, ema_halflife_images=100)
    assert FinetuneConfig(total_images=64, batch_size=64, ema_halflife_images=64).ema_decay(64) == 0.5
    ramped = FinetuneConfig(total_images=64, batch_size=32, ema_halflife_images=10_000, ema_rampup_ratio=0.5)
    assert ramped.ema_decay(64) == 0.5 ** (32 / 32) and ramped.ema_decay(10**6) == 0.5 ** (32 / 10_000)
    with pytest.raises(NeonError, match="ema_rampup_ratio needs finetune.ema_halflife_images"):
        FinetuneConfig(total_images=64, batch_size=64, ema_beta=0.9, ema_rampup_ratio=0.05)


def test_recipe_links_sections_and_rejects_unknown_sections():
    recipe = build_recipe(
        {
            "family": "toy",
            "synthetic": {"out": "S", "num": 10},
            "finetune": {"out": "R", "total_images": 10, "batch_size": 10},
        }
    )
    assert recipe.finetune.data == "S" and recipe.sweep.self_trained == "R"
    with pytest.raises(NeonError, match="unknown recipe section 'trainer'"):
        build_recipe({"family": "toy", "trainer": {}})
    with pytest.raises(NeonError, match="unknown family 'edm2'"):
        build_recipe({"family": "edm2"})
    with pytest.raises(NeonError, match="unknown key sampler.temperature"):
        build_recipe({"family": "toy", "sampler": {"temperature": 0.5}}, ("sampler",))
    with pytest.raises(NeonError, match="unknown key sweep.sampler.zta"):
        build_recipe({"family": "toy", "sweep": {"sampler": {"zta": 1.0}}}, ("sweep",))


# configs/digits/edm.yaml holds the settings of `neon demo digits` (its stages), not a recipe of the
# single verbs; tests/digits checks it.
RECIPES = sorted(
    p
    for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
    if os.sep + "digits" + os.sep not in p
)


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_recipe_validates_and_survives_dry_run(path, capsys):
    raw = config.load_yaml(path)
    build_recipe(raw)
    with open(path) as f:
        assert f.readline().startswith("#"), "a recipe starts with its header comment"
    for verb in ("sample", "finetune", "sweep"):
        cli.main([verb, "--config", path, "--dry-run"])
        resolved = yaml.safe_load(capsys.readouterr().out)
        assert resolved["family"] == raw["family"] and resolved["model"] == build_recipe(raw).model.__dict__
