"""The Family protocol, the lookup of families, and the one path by which θ is read and written.

A family adapts one model family (EDM, VAR, xAR, IMM, the toy) to the core. It is a
`typing.Protocol` with no shared implementation (the template is torchtune's
`recipe_interfaces.py`), holding only what the core calls; helpers two families need live in `neon/`
as functions. Families are found, not listed: the project's own are entry points of the group
`neon.families` (pyproject.toml), and `--family package.module:attribute` loads any other, so a
family joins without an edit under `neon/`.

Contracts every family keeps:
* it never imports `torch.distributed`, never prints and writes no files: the core writes θ through
  `write_checkpoint`, in the container the family's `container` builds;
* determinism, in three levels (README, "Determinism"):
  - bitwise: the same seeds in the same batches, on the same kind of device with the same threads
    per process, give the same bytes, for 1 or N processes, resumed or not;
  - per seed: every random draw of sample i (latents, noise, labels, token draws) depends on
    `seeds[i]` alone, bitwise, whatever the batch;
  - across batch compositions and thread counts, continuous outputs agree within float tolerance
    only (kernels block by batch size and CPU), and a discrete sampler may pick another token where
    two logits tie to the last bit;
* `Sampler` is a frozen dataclass of sampler settings, the recipe's `sampler` section; a guidance
  scale, where there is one, is its field `cfg` (the sweep searches it);
* θ, the weights that are fine-tuned and merged, is `model.net`'s state dict (the core wraps
  `model.net` in DDP for fine-tuning), read from a file at the first of `format.weight_keys` that
  holds a state dict: the EMA where there is one.
"""

import dataclasses
import importlib
import importlib.metadata
import inspect
import itertools
import os
from typing import Protocol

import torch

from neon.errors import NeonError, NonFiniteError
from neon.io import checkpoint

GROUP = "neon.families"  # the entry-point group of pyproject.toml


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded generator.

    net: the network that is fine-tuned and merged (θ is its state dict).
    codec: frozen tokenizer/VAE, or None.
    image_size: output resolution in pixels, or None for non-image families (the toy).
    num_classes: number of class labels, 0 when unconditional.
    arch: JSON-able constructor kwargs of `net` (stored in checkpoints as 'arch').
    extras: JSON-able family settings that are not constructor kwargs (e.g. EDM's augment pipe),
        carried from the base's file into the files the core writes.
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
    """Path of the base checkpoint θ (any container of the family's format)."""
    arch: str | None = None
    """A named architecture preset of the family, for checkpoints that do not carry their kwargs."""
    codec: str | None = None
    """Checkpoint of the frozen tokenizer/VAE, for families that keep it in a file of its own (VAR)."""
    base_training_images: int | None = None
    """Images the base was trained on (epochs × dataset size), as its paper states: `neon report`
    gives the fine-tune and the whole run as a fraction of it."""


class Family(Protocol):
    """What the core calls: the members every family has. The optional ones are `Optional`'s, read
    through `member`. Random draws: the core hands a family CPU generators (the fine-tune's per-step
    one, the per-seed ones of sampling); the family draws on them, on the CPU, and moves the result
    to the model's device, so a seed's draws are the same on any device (DESIGN.md "Devices and
    generators")."""

    name: str
    """The entry-point name ("edm", "var", "xar", "imm", "toy"), recorded in the files the core writes."""
    Sampler: type
    """Frozen dataclass of sampler settings; a guidance scale is the field `cfg`."""
    format: checkpoint.Format
    """Where θ sits in the family's containers, its pickle allowlist (`neon.io.checkpoint.Format`)."""

    def tiny(self, seed: int) -> Model:
        """A model of at most ~1M parameters that runs every code path of the real one."""

    def load(self, path: str, arch: str | None, device: torch.device, codec: str | None = None) -> Model:
        """The full generator (net + frozen codec, read from `codec` where the family keeps it
        apart) from a checkpoint (θ through `read_checkpoint`), in eval mode, strict load."""

    def sample(self, model: Model, labels: torch.Tensor, seeds: torch.Tensor, sampler) -> torch.Tensor:
        """Draw one sample per seed. labels: int64 [B] (−1 = unconditional); seeds: int64 [B].
        Returns uint8 [B,3,H,W] images (the toy: float32 [B,2] points). Runs in inference mode.
        Sample i's draws come from CPU generators seeded from `seeds[i]`, drawn on the CPU and moved
        to the model's device, so a seed gives the same draws on any device; a family that must draw
        on the device (for speed) says so in its docstring, and its samples then differ by device."""

    def loss(self, model: Model, samples: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        """The ordinary training loss (a scalar) on a batch in `sample`'s format, on the model's
        device; random draws (noise levels, noise, label drop) come from `generator`, a CPU
        generator: drawn on the CPU and moved to the model's device (CUDA refuses a CPU generator)."""

    def container(self, model: Model, state_dict: dict[str, torch.Tensor]) -> dict:
        """A fresh checkpoint of the family's own layout holding `state_dict` as θ, with what
        `load` needs besides (arch, extras): what fine-tune snapshots are written as. A family of
        folder checkpoints (`Format.folder_weights`) returns a folder `checkpoint.Container`."""


class Optional(Protocol):
    """The members a family may have; where it has none, `member` gives None and the core's default
    applies (said for each)."""

    def features(self, samples: torch.Tensor) -> torch.Tensor:
        """float64 [B, D] features of a batch of samples, for FID and precision/recall. Default:
        Inception's pool features of uint8 images (`neon.metrics`). The toy and the digits define it."""

    def reference(self) -> tuple:
        """(mu, sigma) of the family's own reference. Default: none, the user passes `--ref`."""

    def real(self, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(samples, labels) drawn from the true distribution: the `--real NAME:N` source of `neon
        diagnose` and the real points of `samples.png`. Default: none (real data from files)."""

    def locate(self, path: str) -> str:
        """The local checkpoint a name stands for (a hub id fetched once into a cache). Default: the
        path as it is."""

    def prepare(self, samples: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The CPU-side part of `loss` (decoding, augmentation) of a batch of `samples` as the synthetic
        set holds them, drawing first from the step's `generator`; `loss` then takes what it returns
        with the same generator. The fine-tune's input pipeline runs it ahead of the step, off the main
        thread (so it draws from no global RNG). Default: none (`loss` takes the samples as they are)."""

    def full_size(self, ckpt: str | None, arch: str | None) -> Model:
        """The recipe's full-size model (network and codec) on the meta device, without reading a
        checkpoint: the preset `arch`, else the one the checkpoint's file name stands for (the paper's
        files). `neon plan` measures it on fake tensors. Default: none (the plan gives no memory or
        FLOPs)."""

    def evaluations(self, sampler) -> float:
        """Network evaluations per sample of `sampler`, in training forwards of one image (a doubled
        batch for guidance counts twice; a cached autoregressive pass over all tokens once): what
        `neon plan` multiplies when the sampler cannot run on fake tensors. Default: 1."""


OPTIONAL = tuple(name for name in vars(Optional) if not name.startswith("_"))


def member(fam, name: str):
    """The optional member `name` of `fam` (`Optional`), or None where the family has none and the
    core's default applies."""
    if name not in OPTIONAL:
        raise ValueError(f"{name!r} is not an optional member of a family ({', '.join(OPTIONAL)})")
    return getattr(fam, name, None)


def preset_of(ckpt: str | None, arch: str | None, presets: dict, files: dict, family_name: str) -> dict:
    """The preset kwargs `arch` names, else those of the paper's checkpoint `ckpt` is by file name
    (`files`: basename → preset name); NeonError naming the presets otherwise. For `full_size`."""
    name = arch or files.get(os.path.basename(ckpt or ""))
    if name not in presets:
        raise NeonError(f"{family_name}: cannot tell the architecture of {ckpt!r}; pass --model.arch "
                        f"{'|'.join(presets)}")
    return presets[name]


def names() -> list[str]:
    """The installed families' names (entry points of `neon.families`)."""
    return sorted({entry.name for entry in importlib.metadata.entry_points(group=GROUP)})


def get(spec: str):
    """The family `spec` names: an installed entry point ("edm") or "package.module:attribute"
    (a family defined anywhere). NeonError when it cannot be found."""
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise NeonError(f"cannot load family {spec!r}: {e}") from None
    found = [entry for entry in importlib.metadata.entry_points(group=GROUP) if entry.name == spec]
    if not found:
        raise NeonError(f"unknown family {spec!r} (installed: {', '.join(names()) or 'none'}; "
                        f"or give package.module:attribute)")
    return found[0].load()


def local_path(fam, path: str) -> str:
    """The local checkpoint `path` names for family `fam`: its `locate(path)` where it has one (a
    hub id fetched once into a cache), else `path`."""
    locate = member(fam, "locate")
    return locate(path) if locate is not None else path


def read_checkpoint(fam, path: str, mmap: bool = False) -> checkpoint.Container:
    """A checkpoint of family `fam` (`local_path`), θ located by its format: `.weights` is θ.
    Everything that reads θ (the family's `load`, the sweep, `neon merge`) reads it here."""
    return checkpoint.read(local_path(fam, path), fam.format, mmap=mmap)


def write_checkpoint(fam, state_dict: dict[str, torch.Tensor], path: str, like, format: str = "same",
                     **extra) -> None:
    """Write θ = `state_dict` atomically: in the layout of container `like` (a `Container`: its other
    entries kept; `format='safetensors'` writes plain tensors instead), or, for a `Model`, in the
    family's fresh container, with `extra` entries added (fine-tune snapshots record `family` and
    `images_seen`). Everything that writes θ writes it here."""
    if isinstance(like, Model):
        data = fam.container(like, state_dict)
        if isinstance(data, checkpoint.Container):  # a folder: the extra entries go in its record
            data = dataclasses.replace(data, data={**data.data, **extra})
            checkpoint.write_like(data, state_dict, path)
            return
        clash = sorted(k for k in set(data) & set(extra) if data[k] != extra[k])
        if clash:
            raise ValueError(f"family {fam.name!r}: its container holds other values under {clash}")
        checkpoint.write({**data, **extra}, path)
    else:
        checkpoint.write_like(like, state_dict, path, format)


def detect(path: str, spec: str | None = None):
    """The family of checkpoint `path` for commands that take no --family (`neon merge`): `spec`
    when given, else the `family` a file of ours records, else the one installed family whose
    format reads the file (families that read it at the same place agree). NeonError otherwise."""
    if spec:
        return get(spec)
    if checkpoint.format_of(path) == "pt":
        recorded = checkpoint.peek(path).get("family")
        if isinstance(recorded, str):
            if recorded not in names():
                raise NeonError(f"{path} is a checkpoint of family {recorded!r}, which is not installed; "
                                f"pass --family package.module:attribute")
            return get(recorded)
    readers, errors = {}, []
    for name in names():
        fam = get(name)
        try:
            readers[name] = (fam, read_checkpoint(fam, path, mmap=True).weights_key)
        except NeonError as e:
            errors.append(str(e))
    if not readers:
        refused = [e for e in errors if "refused" in e]
        raise NeonError(refused[0] if refused else f"{path}: no installed family reads this file "
                        f"({errors[0] if errors else 'none installed'}); pass --family")
    if len({key for _, key in readers.values()}) > 1:
        raise NeonError(
            f"{path}: families {', '.join(sorted(readers))} read θ from different places; pass --family"
        )
    return next(iter(readers.values()))[0]


def load_weights(
    module: torch.nn.Module, state_dict: dict, path: str, what: str, assign: bool = False
) -> None:
    """`module.load_state_dict(state_dict, strict=True)`, a mismatch reported as one line naming the file,
    what it should have fitted (`what`, e.g. "EDMPrecond") and the missing, unexpected and reshaped keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    reshaped = [f"{k} {list(state_dict[k].shape)} (expected {list(expected[k].shape)})"
                for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    problems = [
        f"{label}: {_listed(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shapes differ", reshaped),
        )
        if keys
    ]
    if problems:
        raise NeonError(f"{path} does not fit {what}: " + "; ".join(problems))
    try:
        module.load_state_dict(state_dict, strict=True, assign=assign)
    except RuntimeError as e:
        raise NeonError(f"{path} does not fit {what}: {str(e).splitlines()[0]}") from None


def load_built(net: torch.nn.Module, state_dict: dict, path: str, what: str,
               device: torch.device | str = "cpu") -> torch.nn.Module:
    """θ = `state_dict` loaded strictly into the built network `net` (`load_weights`; a network built on
    the meta device takes the file's tensors as they are: nothing is allocated or initialised twice),
    moved to `device`, in eval mode with gradients off. Returns `net`."""
    on_meta = any(t.is_meta for t in itertools.chain(net.parameters(), net.buffers()))
    load_weights(net, state_dict, path, what, assign=on_meta)
    return net.to(device).eval().requires_grad_(False)


def build_and_load(constructor, kwargs, state_dict: dict, path: str, what: str,
                   device: torch.device | str = "cpu", on_meta: bool = False) -> torch.nn.Module:
    """The one way a family turns (arch, θ) into its network: `build_net(constructor, kwargs)` (on the
    meta device when `on_meta`: every tensor of the network is in θ), then `load_built`."""
    return load_built(build_net(constructor, kwargs, path, what, on_meta), state_dict, path, what, device)


def _listed(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


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


MAX_NET_BYTES = 64 * 2**30
"""The largest network a checkpoint's `arch` may describe (parameters and buffers): 64 GiB, 7× the
paper's largest model (VAR-d36, 2.3B parameters in float32)."""


def build_net(constructor, kwargs, path: str, what: str, on_meta: bool = False) -> torch.nn.Module:
    """`constructor(**kwargs)` for the `arch` a checkpoint names, checked first: kwargs a mapping of
    the constructor's keyword arguments (NeonError naming an unknown one), the network built on the
    meta device within `MAX_NET_BYTES`, any error of construction reported as one line naming `path`.
    With `on_meta`, the meta-device network itself is returned (for `load_built` to fill from θ)."""
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise NeonError(f"{path}: arch must be a mapping of {what}'s arguments, got {kwargs!r}")
    params = inspect.signature(constructor).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise NeonError(
                f"{path}: unknown arch key {unknown[0]!r} for {what} (known: {', '.join(params)})"
            )
    try:
        with torch.device("meta"):
            probe = constructor(**kwargs)
        size = sum(t.numel() * t.element_size() for t in itertools.chain(probe.parameters(), probe.buffers()))
    except NotImplementedError:
        probe, size = None, 0  # a layer the meta device cannot build: trust the constructor's own checks
    except NeonError:
        raise
    except Exception as e:
        raise NeonError(f"{path}: arch {kwargs} does not build {what}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if size > MAX_NET_BYTES:
        raise NeonError(f"{path}: arch describes a {size / 2**30:,.0f} GiB {what}, above the limit of "
                        f"{MAX_NET_BYTES / 2**30:.0f} GiB (a damaged or hostile arch?)")
    if on_meta and probe is not None:
        return probe
    return constructor(**kwargs)


def check_finite(samples: torch.Tensor, what: str) -> torch.Tensor:
    """`samples` unchanged when every entry is finite; else NeonError (a family calls it on its
    float images before the uint8 cast, which would turn NaN into a silent 0)."""
    if samples.is_floating_point() and not torch.isfinite(samples).all():
        raise NonFiniteError(
            f"the {what} produced non-finite values (NaN or inf): a diverged model or sampler setting"
        )
    return samples
