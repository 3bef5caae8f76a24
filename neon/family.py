"""The Family protocol and the registry of family names.

A family adapts one model family (EDM, VAR, xAR, IMM, the toy) to the core. It is a
`typing.Protocol`, with no shared implementation (the template is torchtune's
`recipe_interfaces.py`): helpers two families need live in `neon/` as functions.

Contracts every family keeps:
* it never imports `torch.distributed`, never prints, and writes files only in `save`;
* every random draw of sample i comes from a generator seeded with `seeds[i]`, so a sample does not
  depend on its batch, its rank or the world size;
* `weights(container)` has exactly the keys of `trainable(model).state_dict()`, and
  `trainable(model)` is `model.net` (the core wraps it in DDP for fine-tuning);
* `Sampler` is a frozen dataclass of sampler settings, the recipe's `sampler` section.

The registry below is the only place in the core where family names appear.
"""

import dataclasses
import importlib
from typing import Any, Protocol

import numpy as np
import torch

from neon.errors import NeonError

# name -> "module:attribute" of the family object. A family joins by adding one line.
REGISTRY = {
    "toy": "neon.toy.family:family",
    "edm": "edm.family:family",
    "var": "VAR.family:family",
}


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded generator.

    net: the network that is fine-tuned and merged (θ).
    codec: frozen tokenizer/VAE, or None.
    image_size: output resolution in pixels, or None for non-image families (the toy).
    num_classes: number of class labels, 0 when unconditional.
    arch: JSON-able constructor kwargs of `net` (stored in checkpoints as 'arch').
    extras: JSON-able family settings that are not constructor kwargs (e.g. EDM's augment pipe).
    """

    net: torch.nn.Module
    codec: torch.nn.Module | None = None
    image_size: int | None = None
    num_classes: int = 0
    arch: dict = dataclasses.field(default_factory=dict)
    extras: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The recipe's `model` section."""

    ckpt: str | None = None
    """Path of the base checkpoint θ (any container `neon.checkpoint.read` understands)."""
    arch: str | None = None
    """A named architecture preset of the family, for checkpoints that do not carry their kwargs."""
    codec: str | None = None
    """Checkpoint of the frozen tokenizer/VAE, for families that keep it in a file of its own (VAR)."""


class Family(Protocol):
    name: str
    Sampler: type

    def tiny(self, seed: int) -> Model:
        """A model of at most ~1M parameters that runs every code path of the real one."""

    def load(self, path: str, arch: str | None, device: torch.device, codec: str | None = None) -> Model:
        """The full generator (net + frozen codec, read from `codec` where the family keeps it
        apart) from a checkpoint, in eval mode, strict load."""

    def sample(self, model: Model, labels: torch.Tensor, seeds: torch.Tensor, sampler) -> torch.Tensor:
        """Draw one sample per seed. labels: int64 [B] (−1 = unconditional); seeds: int64 [B].
        Returns uint8 [B,3,H,W] images (the toy: float32 [B,2] points). Runs in inference mode."""

    def trainable(self, model: Model) -> torch.nn.Module:
        """The module that is fine-tuned and merged (`model.net`)."""

    def loss(self, model: Model, samples: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        """The ordinary training loss (a scalar) on a batch in `sample`'s format; random draws
        (noise levels, noise, label drop) come from `generator`."""

    def weights(self, container) -> dict[str, torch.Tensor]:
        """θ from a checkpoint container (the EMA where there is one)."""

    def save(self, state_dict: dict[str, torch.Tensor], path: str, like) -> None:
        """Write θ in the family's native container, shaped like container `like` (or a fresh one
        when `like` is None), through `neon.checkpoint`."""

    def features(self, samples: torch.Tensor) -> torch.Tensor:
        """Features the sweep's Fréchet distance is computed on: float64 [B, D]."""

    def reference(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Built-in reference statistics (mu [D], sigma [D,D]), or None when a file is needed."""


def get(name: str) -> Any:
    """The family registered as `name`; NeonError for an unknown name."""
    if name not in REGISTRY:
        raise NeonError(f"unknown family {name!r} (known: {', '.join(sorted(REGISTRY))})")
    module, attr = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


def arch_kwargs(container, arch: str | None, presets: dict, family_name: str) -> dict | None:
    """Constructor kwargs for a checkpoint: the named preset, else the `arch` the file carries, else
    None (the family may infer them or ask for --model.arch)."""
    if arch is not None:
        if arch not in presets:
            raise NeonError(f"unknown {family_name} arch {arch!r} (known: {', '.join(presets)})")
        return presets[arch]
    if isinstance(container.data.get("arch"), dict):
        return container.data["arch"]
    return None
