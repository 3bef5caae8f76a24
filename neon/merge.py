"""The extrapolation step of Neon: θ_neon = (1 + w) θ_base − w θ_self_trained.

`extrapolate` applies it to two state dicts in memory; `merge_files` applies it to two checkpoint
files and writes the result in the base's container, so the merged file is evaluated with the same
command as the base. All file I/O goes through `neon.io`.
"""

import collections
import logging
import math
import numbers
import os
from collections.abc import Iterator, Mapping

import torch

from neon import family as neon_family
from neon.errors import NeonError
from neon.io import checkpoint, safetensors

logger = logging.getLogger(__name__)


def extrapolate(base: Mapping[str, torch.Tensor], self_trained: Mapping[str, torch.Tensor],
                w: float, allow_nonfinite: bool = False) -> dict[str, torch.Tensor]:
    """Neon paper, Algorithm 1: result[k] = (1 + w) · base[k] − w · self_trained[k].

    Floating tensors are computed in float32 (float64 when the base tensor is float64) and cast
    back to the base dtype. Non-floating tensors (integer buffers, bool) and tensors with any
    non-finite entry in the base (e.g. attention masks holding −inf) are the base's tensor,
    unchanged; a self-trained tensor must be floating exactly where the base's is. The
    inputs are not modified.

    Args:
        base: θ_base.
        self_trained: θ_base briefly fine-tuned on its own samples; the same keys and shapes as
            `base` (dtypes may differ).
        w: the extrapolation weight, a finite real number.
        allow_nonfinite: accept NaN/inf in a self-trained tensor whose base is finite, and results
            that overflow the base dtype (otherwise a NeonError names the tensor).

    Returns:
        A new dict with the keys of `base`, in its order. Raises `NeonError` if w is not finite
        or the keys or shapes differ (the message names the differing keys).
    """
    w = _check_w(w)
    _check_match(_shapes(base), _shapes(self_trained))
    return {name: _extrapolate_tensor(a, self_trained[name], w, name=name, allow_nonfinite=allow_nonfinite)[0]
            for name, a in base.items()}


@torch.no_grad()
def extrapolate_into(module: torch.nn.Module, base: Mapping[str, torch.Tensor],
                     self_trained: Mapping[str, torch.Tensor] | None, w: float) -> None:
    """Load θ_neon = (1 + w) base − w self_trained (`extrapolate`'s arithmetic and checks) into
    `module`'s own parameters and buffers, on their device, one tensor at a time: no second copy of
    the network is built, and the inputs (CPU or memory-mapped) are moved a tensor at a time. With
    `self_trained` None or w = 0 it loads `base`. Keys must be exactly the module's (strict)."""
    target = module.state_dict()
    _check_match(_shapes(target), _shapes(base), "the network", "base")
    if self_trained is not None and w != 0:
        w = _check_w(w)
        _check_match(_shapes(base), _shapes(self_trained))
    for name, out in target.items():
        a = base[name].to(out.device)
        if self_trained is not None and w != 0:
            a = _extrapolate_tensor(a, self_trained[name].to(out.device), w, name=name)[0]
        out.copy_(a)


def merge_files(base_path: str, self_path: str, w: float, out_path: str, format: str = "same",
                family=None, allow_nonfinite: bool = False) -> None:
    """Extrapolate two checkpoint files (Neon paper, Algorithm 1) into `out_path`.

    θ of each file is read as the sweep reads it, `neon.family.read_checkpoint` with the format of
    `family` (default: `neon.family.detect` on the base); non-finite values are refused as in
    `extrapolate` unless `allow_nonfinite`. The output
    keeps the base's container: its layout and every non-weight entry for `.pt`, its metadata for
    `.safetensors`; `format='safetensors'` writes plain tensors instead. Everything is validated
    before anything is written, and the write is atomic, so on any error no output file exists.

    Memory stays near one checkpoint: two `.safetensors` inputs merged into a `.safetensors`
    output are streamed tensor by tensor (peak: a few tensors); otherwise the base is loaded and
    updated in place while the self-trained file is memory-mapped.
    """
    w = _check_w(w)
    base_format = checkpoint.format_of(base_path)
    self_format = checkpoint.format_of(self_path)
    checkpoint.output_format(base_format, out_path, format)  # refuses a bad format or suffix before any work
    if os.path.realpath(out_path) in (os.path.realpath(base_path), os.path.realpath(self_path)):
        raise NeonError(f"{out_path}: the output must not overwrite an input")

    if base_format == self_format == "safetensors":  # then the output is .safetensors too
        base_specs, metadata = safetensors.header(base_path)
        self_specs, _ = safetensors.header(self_path)
        _check_match({k: shape for k, (_, shape) in base_specs.items()},
                     {k: shape for k, (_, shape) in self_specs.items()}, base_path, self_path)
        counts = collections.Counter()
        specs = [(name, dtype, shape) for name, (dtype, shape) in base_specs.items()]
        merged = _streamed(base_path, self_path, list(base_specs), w, counts, allow_nonfinite)
        safetensors.write(out_path, specs, merged, metadata)
    else:
        fam = family if family is not None else neon_family.detect(base_path)
        base = neon_family.read_checkpoint(fam, base_path)
        self_trained = neon_family.read_checkpoint(fam, self_path, mmap=self_format == "pt")
        base_sd, self_sd = base.weights, self_trained.weights
        _check_match(_shapes(base_sd), _shapes(self_sd), base_path, self_path)
        # In-place updates are safe only for a tensor whose storage nothing else in the file
        # shares (tied weights, or a raw 'model' entry aliasing the EMA), else an aliased
        # tensor would be extrapolated twice or a kept entry silently changed.
        owners = collections.Counter(t.untyped_storage().data_ptr() for t in _tensors(base.data))
        counts = collections.Counter()
        merged = {}
        for name, a in base_sd.items():
            in_place = owners[a.untyped_storage().data_ptr()] == 1
            merged[name], done = _extrapolate_tensor(a, self_sd[name], w, in_place, name, allow_nonfinite)
            counts[done] += 1
        del self_sd, self_trained  # release the mapping before writing
        neon_family.write_checkpoint(fam, merged, out_path, like=base, format=format)
    logger.info("merged %s and %s with w=%g into %s (%d tensors extrapolated, %d copied from base)",
                base_path, self_path, w, out_path, counts[True], counts[False])


def check_self_trained(base: Mapping[str, torch.Tensor], self_trained: Mapping[str, torch.Tensor],
                       name: str = "self-trained") -> None:
    """Refuse self-trained weights that `extrapolate` would refuse at some w ≠ 0: other keys or shapes,
    a floating tensor where the base's is not (or the reverse), NaN/inf where the base is finite. For
    checks before any work (the sweep checks every snapshot before its first evaluation); NeonError
    naming `name` and the tensor."""
    _check_match(_shapes(base), _shapes(self_trained), "base", name)
    for key, a in base.items():
        b = self_trained[key]
        _check_kind(a, b, key)
        if a.is_floating_point() and _all_finite(a) and not _all_finite(b):
            raise NeonError(f"{name}: {key} holds non-finite values (NaN or inf) where the base is finite: "
                            f"a diverged fine-tune?")


def _check_kind(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """A floating tensor is extrapolated, any other copied from the base: both sides must agree which."""
    if a.is_floating_point() != b.is_floating_point():
        mine, base = (str(t.dtype).replace("torch.", "") for t in (b, a))
        raise NeonError(f"the self-trained {name or 'tensor'} is {mine} where the base's is {base}: not "
                        f"weights of the same network")


def _streamed(base_path: str, self_path: str, names: list[str], w: float,
              counts: collections.Counter, allow_nonfinite: bool) -> Iterator[torch.Tensor]:
    # Both files are read in the base's order; each base buffer is ours, so it is updated in place.
    pairs = zip(safetensors.iterate(base_path, names),
                safetensors.iterate(self_path, names))
    for (name, a), (_, b) in pairs:
        out, done = _extrapolate_tensor(a, b, w, True, name, allow_nonfinite)
        counts[done] += 1
        del a, b  # hold one output, not last step's inputs, while the next pair is read
        yield out
        del out


def _extrapolate_tensor(a: torch.Tensor, b: torch.Tensor, w: float, in_place: bool = False, name: str = "",
                        allow_nonfinite: bool = False) -> tuple[torch.Tensor, bool]:
    """(result, whether it was extrapolated) for one tensor; `in_place` may overwrite `a`."""
    _check_kind(a, b, name)
    if not a.is_floating_point() or not _all_finite(a):
        return a, False
    if not allow_nonfinite and not _all_finite(b):
        raise NeonError(f"the self-trained {name or 'tensor'} holds non-finite values (NaN or inf) where the "
                        f"base is finite: a diverged fine-tune? (--allow-nonfinite writes it anyway)")
    compute = torch.float64 if a.dtype == torch.float64 else torch.float32
    wb = w * b.to(compute)
    if in_place and a.dtype == compute:
        # The same two roundings as (1 + w) * a - w * b, with one temporary instead of three.
        out = a.mul_(1 + w).sub_(wb)
    else:
        out = ((1 + w) * a.to(compute) - wb).to(a.dtype)
    if not allow_nonfinite and not _all_finite(out):
        raise NeonError(
            f"w={w:g} overflows {str(a.dtype).replace('torch.', '')} in {name or 'a tensor'}: choose a "
            f"smaller |w| (--allow-nonfinite writes it anyway)"
        )
    return out, True


def _all_finite(a: torch.Tensor) -> bool:
    # aminmax propagates NaN and ±inf, allocates nothing of a's size, and on CPU runs ~15x faster
    # than isfinite(a).all().
    if a.numel() == 0:
        return True
    low, high = torch.aminmax(a)
    return math.isfinite(low.item()) and math.isfinite(high.item())


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _check_w(w) -> float:
    if isinstance(w, bool) or not isinstance(w, numbers.Real):
        raise NeonError(f"w must be a finite number, got {w!r}")
    w = float(w)
    if not math.isfinite(w):
        raise NeonError(f"w must be finite, got {w}")
    return w


def _shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in state_dict.items()}


def _check_match(base: Mapping[str, tuple], self_trained: Mapping[str, tuple],
                 base_name: str = "base", self_name: str = "self-trained") -> None:
    """Raise one NeonError naming every key whose presence or shape differs."""
    missing = [k for k in base if k not in self_trained]
    extra = [k for k in self_trained if k not in base]
    reshaped = [f"{k} {list(base[k])} vs {list(self_trained[k])}"
                for k in base if k in self_trained and tuple(base[k]) != tuple(self_trained[k])]
    problems = []
    if missing:
        problems.append(f"missing from self-trained: {_listed(missing)}")
    if extra:
        problems.append(f"not in base: {_listed(extra)}")
    if reshaped:
        problems.append(f"shapes differ: {_listed(reshaped)}")
    if problems:
        raise NeonError(f"{self_name} does not match {base_name}: " + "; ".join(problems))


def _listed(items: list[str], limit: int = 5) -> str:
    text = ", ".join(items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")
