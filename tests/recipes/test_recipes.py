"""The recipe audit: each paper row's recipe, resolved as `neon <verb> --dry-run` resolves it, against
the authors' settings in tests/recipes/authors.yaml (with the source file of each row); a field that
differs and is not listed among the row's deliberate differences (with a reason) fails."""

import copy
import os

import pytest
import yaml

from neon import cli, config
from neon.recipe import build_recipe

TABLE = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "authors.yaml")))


def resolved(raw: dict) -> dict:
    """The recipe `raw` (a dict as loaded from YAML) resolved with every section, as plain data."""
    return config.to_dict(build_recipe(raw))


def audit(values: dict, row: dict) -> list[str]:
    """The drift of a resolved recipe from its row: one line per audited field that is neither the
    authors' value nor the deliberate difference listed for it."""
    drift = []
    for key, authors in row["authors"].items():
        section, field = key.split(".")
        ours = values[section][field]
        expected = row["differences"][key]["ours"] if key in row.get("differences", {}) else authors
        if _plain(ours) != _plain(expected):
            drift.append(
                f"{row['recipe']}: {key} is {ours!r}, the audit expects {expected!r} "
                f"(authors: {authors!r}; {row['source']})"
            )
    return drift


def _plain(value):
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("name", sorted(TABLE))
def test_each_recipe_matches_the_authors_or_states_why_not(name):
    row = TABLE[name]
    assert audit(resolved(config.load_yaml(row["recipe"])), row) == []
    for key, difference in row.get("differences", {}).items():
        assert key in row["authors"] and len(difference["reason"]) > 20, key


def test_the_audit_catches_a_changed_field():
    row = TABLE["edm_cifar10_cond"]
    raw = config.load_yaml(row["recipe"])
    for key, value in (("finetune.ema_rampup_ratio", 0.05), ("sweep.num", 50000), ("sweep.search", "grid")):
        changed = copy.deepcopy(raw)
        config.set_dotted(changed, key, value, parse=False)
        drift = audit(resolved(changed), row)
        assert len(drift) == 1 and key in drift[0]
    xar = TABLE["xar_l_in256"]
    raw = config.load_yaml(xar["recipe"])
    config.set_dotted(raw, "sweep.refine", None, parse=False)
    assert [line.split(" is ")[0] for line in audit(resolved(raw), xar)] == [f"{xar['recipe']}: sweep.refine"]


def test_every_edm_recipe_has_no_ema_ramp_up_and_xar_l_reaches_cfg_2_7(capsys):
    for name in ("cifar10_cond", "cifar10_uncond", "ffhq64"):
        values = resolved(config.load_yaml(f"configs/edm/{name}.yaml"))
        assert (
            values["finetune"]["ema_rampup_ratio"] is None
            and values["finetune"]["ema_halflife_images"] == 500000
        )
    cli.main(["sweep", "--config", "configs/xAR/xar_l_in256.yaml", "--dry-run"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("# selection: coordinate + halving") and "2.7" in line.split("cfg reachable: ")[1]
