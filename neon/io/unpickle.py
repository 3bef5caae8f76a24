"""The restricted unpickler: `.pkl` network files read as data, never as code.

A `.pkl` is read by an unpickler that resolves only an allowlist of globals (the arcee-ai/mergekit
`lazy_unpickle` pattern): tensor rebuilding and plain containers here (`TENSOR_GLOBALS`), plus what a
family's `Format.pickle_globals` adds. A family maps the classes its pickles name to `Record` types, so
their objects arrive as data (class name + state) and no constructor, `__reduce__` or code carried by
the file ever runs; its `from_pickle` then turns those records into plain dicts.
"""

import collections
import io
import pickle
from collections.abc import Callable, Mapping

import numpy as np
import torch

from neon.errors import NeonError, first_sentence


class Record:
    """A pickled object as data: `class_name` and the `state` (its __dict__) it was pickled with."""

    class_name = ""

    def __init__(self, class_name: str = "", state: dict | None = None):
        self.class_name, self.state = class_name or type(self).class_name, state if state is not None else {}

    def __setstate__(self, state):  # objects built by NEWOBJ + BUILD (torch's ModuleDict, ...)
        self.state = state


def record_class(name: str) -> type:
    """A `Record` type standing for class `name`: allowlist it for a global whose instances
    should arrive as data."""
    return type(name, (Record,), {"class_name": name})


def _load_storage(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


_NUMPY_SCALAR = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar


TENSOR_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy._core.multiarray", "scalar"): _NUMPY_SCALAR,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed: Mapping[tuple[str, str], object]):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise pickle.UnpicklingError(
            f"refused {module}.{name}: not on the allowlist of this family's pickles"
        )


def read(
    path: str, allowed: Mapping[tuple[str, str], object], from_pickle: Callable[[object], dict] | None
) -> dict:
    """The `.pkl` at `path` unpickled with only the globals of `allowed` resolvable, turned into a plain
    dict by `from_pickle` (None: no family reads pickles, refused after the allowlist had its say);
    NeonError (one line) for anything refused or malformed."""
    try:
        with open(path, "rb") as f:
            raw = _RestrictedUnpickler(f, allowed).load()
        if from_pickle is None:
            raise NeonError(f"cannot read network pickle {path}: no family format given for .pkl files "
                            f"(pass --family)")
        data = from_pickle(raw)
    except (
        pickle.UnpicklingError,
        EOFError,
        AttributeError,
        ValueError,
        TypeError,
        RuntimeError,
        KeyError,
    ) as e:
        raise NeonError(f"cannot read network pickle {path}: {first_sentence(e)}") from None
    if not isinstance(data, dict):
        raise NeonError(
            f"cannot read network pickle {path}: top level is a {type(data).__name__}, not a dict"
        )
    return data

def module_state_dict(record: Record, prefix: str = "", out: dict | None = None) -> dict:
    """The state dict of a recorded torch module (its `_parameters`, persistent `_buffers` and
    `_modules`, recursively), keys in `state_dict()` order."""
    out = {} if out is None else out
    state = record.state
    for name, tensor in state.get("_parameters", {}).items():
        if tensor is not None:
            out[prefix + name] = tensor.detach()
    skip = state.get("_non_persistent_buffers_set", set())
    for name, tensor in state.get("_buffers", {}).items():
        if tensor is not None and name not in skip:
            out[prefix + name] = tensor
    for name, child in state.get("_modules", {}).items():
        if child is not None:
            if not isinstance(child, Record):
                raise pickle.UnpicklingError(
                    f"unexpected module {prefix + name} of type {type(child).__name__}"
                )
            module_state_dict(child, f"{prefix}{name}.", out)
    return out


def plain(value):
    """Recorded values as JSON-able Python values (numpy scalars → numbers, tuples → lists)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    return value
