"""The resolved recipe: the sections one verb needs, validated, with the links between them filled.

A recipe (STYLE.md §4) is a mapping of the sections `family`, `deterministic`, `model`, `sampler`,
`synthetic`, `finetune`, `sweep` and `fid`; each section becomes the frozen dataclass of the module
that uses it. `neon.cli` resolves the mapping (--config, then the verb's flags, then dotted
overrides); `build_recipe` turns it into a `Recipe`.
"""

from __future__ import annotations

import dataclasses

from neon import config, family, finetune, sweep, synthetic
from neon.errors import NeonError
from neon.metrics import inception

SECTIONS = ("family", "deterministic", "model", "sampler", "synthetic", "finetune", "sweep", "fid")
_SCALARS = ("family", "deterministic")  # the two sections that are one value, not a mapping


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A resolved recipe: the sections one verb needs (the others stay None)."""

    family: str
    model: family.ModelConfig
    deterministic: bool = False
    sampler: object = None
    synthetic: synthetic.SyntheticConfig | None = None
    finetune: finetune.FinetuneConfig | None = None
    sweep: sweep.SweepConfig | None = None
    fid: inception.FidConfig | None = None


def build_recipe(raw: dict, sections=SECTIONS) -> Recipe:
    """Validate `raw` (a recipe dict) and build the named sections. Unfilled links between sections
    are resolved here: finetune.data defaults to synthetic.out, sweep.self_trained to finetune.out."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise NeonError(f"unknown recipe section {unknown[0]!r} (known: {', '.join(SECTIONS)})")
    if not raw.get("family"):
        raise NeonError("family (--family) is required")
    fam = family.get(raw["family"])
    deterministic = raw.get("deterministic", False)
    if not isinstance(deterministic, bool):
        raise NeonError(f"deterministic: expected true or false, got {deterministic!r}")
    for name, value in raw.items():
        if name not in _SCALARS and value is not None and not isinstance(value, dict):
            raise NeonError(f"{name}: expected a mapping of fields, got {value!r}")
    raw = {k: dict(v or {}) if k not in _SCALARS else v for k, v in raw.items()}
    ft, sw = raw.setdefault("finetune", {}), raw.setdefault("sweep", {})
    if ft.get("data") is None and raw.get("synthetic", {}).get("out"):
        ft["data"] = raw["synthetic"]["out"]
    if sw.get("self_trained") is None and ft.get("out"):
        sw["self_trained"] = ft["out"]
    built = {"family": raw["family"], "deterministic": deterministic,
             "model": config.build(family.ModelConfig, raw.get("model"), "model")}
    types = {"sampler": fam.Sampler, "synthetic": synthetic.SyntheticConfig,
             "finetune": finetune.FinetuneConfig, "sweep": sweep.SweepConfig, "fid": inception.FidConfig}
    for name in sections:
        if name in types:
            built[name] = config.build(types[name], raw.get(name), name)
    if "sweep" in sections:  # the evaluation sampler: the recipe's with sweep.sampler's fields changed
        config.build(fam.Sampler, {**(raw.get("sampler") or {}), **built["sweep"].sampler}, "sweep.sampler")
    return Recipe(**built)


def resolved(recipe: Recipe) -> dict:
    """The recipe as plain data, without the sections it does not hold (config.resolved.yaml)."""
    return {k: v for k, v in config.to_dict(recipe).items() if v is not None}
