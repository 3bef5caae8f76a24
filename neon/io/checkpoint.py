"""θ checkpoints: where the weights sit in a family's files, read safely, written back in the same layout.

Families declare their files in a `Format` (where θ sits in their containers, the globals their
pickles may reference, how an unpickled object becomes plain data) and `read` applies it: `.pt`/`.pth`
files are loaded with `weights_only=True` (an `argparse.Namespace` inside becomes a dict), `.safetensors`
files are streamed through `neon.io.safetensors`, `.pkl` files go through the restricted unpickler of
`neon.io.unpickle`. The result is a `Container` that remembers where θ lives; `write_like` writes a new θ
back in the same layout, atomically (`neon.io.files.atomic`). This module names no family.
"""

import argparse
import copy
import dataclasses
import io
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence

import torch

from neon.errors import NeonError, first_sentence
from neon.io import files, folder, safetensors, unpickle


@dataclasses.dataclass(frozen=True)
class Format:
    """What a family declares about its checkpoint files; `read` applies it.

    weight_keys: where θ may sit in a container, as paths of dict keys, in order of preference
        (the EMA first wherever a file has one: the network the paper samples from and merges).
    pickle_globals: the globals a `.pkl` of the family may reference, (module, name) → the object
        to use instead, on top of `neon.io.unpickle.TENSOR_GLOBALS`; everything else is refused.
    from_pickle: turns the unpickled object into the plain dict a `Container` holds; without it,
        `.pkl` files are refused.
    folder_weights: for families whose checkpoints are folders (a pipeline folder of several
        components): where θ's file may sit inside one, as relative paths in order of preference
        (`.safetensors`, or a `.pt`/`.bin` read with `weights_only`). Empty: folders are refused.
        Such a family's fine-tune snapshots are folders too (`neon.finetune.snapshot_name`).
    """

    weight_keys: tuple[tuple[str, ...], ...] = ((),)
    pickle_globals: Mapping[tuple[str, str], object] = dataclasses.field(default_factory=dict)
    from_pickle: Callable[[object], dict] | None = None
    folder_weights: tuple[str, ...] = ()


# For files no family owns (Inception weights, test files): a flat state dict or one under a
# generic key.
GENERIC = Format(weight_keys=((), ("ema",), ("model",), ("state_dict",)))


# `.ckpt`: a torch save under another name (MAR's kl16.ckpt).
# `.bin`: a torch save under another name (the pickled weights of Hugging Face model folders).
_SUFFIXES = {
    ".pt": "pt",
    ".pth": "pt",
    ".ckpt": "pt",
    ".bin": "pt",
    ".safetensors": "safetensors",
    ".pkl": "pkl",
}
# A folder checkpoint's entries besides θ (`images_seen`, `family`), as JSON inside the folder.
FOLDER_RECORD = "neon.json"


@dataclasses.dataclass
class Container:
    """A checkpoint file as read: the whole object plus where θ lives inside it.

    `data` is the object as loaded (a dict); `weights_key` is the path of dict keys to the state
    dict (`()` when `data` is itself the flat state dict); `metadata` is the safetensors
    `__metadata__` (empty for `.pt`).

    A folder checkpoint (format 'folder', `Format.folder_weights`) holds θ under one key, the
    relative path of its file, beside the entries of the folder's `FOLDER_RECORD`. `path` is the
    folder whose other files a written copy links (None for a folder made from memory alone),
    `replaces` the files of `path` that θ's file stands in for (not linked), and `files` what is
    written from memory besides (relative path → bytes, or a state dict written as safetensors).
    """

    path: str | None
    format: str  # 'pt' | 'safetensors' | 'folder'
    data: dict
    weights_key: tuple[str, ...]
    metadata: dict = dataclasses.field(default_factory=dict)
    replaces: tuple[str, ...] = ()
    files: dict = dataclasses.field(default_factory=dict)

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The state dict at `weights_key` (the object inside `data`, not a copy)."""
        node = self.data
        for key in self.weights_key:
            node = node[key]
        return node


def format_of(path: str) -> str:
    """The checkpoint format a file name implies: 'pt' (.pt/.pth), 'safetensors' or 'pkl'; 'folder'
    for an existing directory."""
    if os.path.isdir(path):
        return "folder"
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in _SUFFIXES:
        raise NeonError(
            f"{path}: unknown checkpoint format (expected .pt, .pth, .ckpt, .safetensors or .pkl)"
        )
    return _SUFFIXES[suffix]


def read(path: str, fmt: Format = GENERIC, mmap: bool = False) -> Container:
    """Read a checkpoint file and locate θ in it with `fmt.weight_keys`.

    Args:
        path: a `.pt`/`.pth` file (loaded with `weights_only=True` onto the CPU; an
            `argparse.Namespace` inside, such as a training script's `args`, becomes a dict), a
            `.safetensors` file, or a `.pkl` read through `fmt`'s restricted unpickler.
        fmt: the family's `Format` (default: `GENERIC`).
        mmap: map `.pt` tensors from the file instead of reading them (pages load on first
            touch). Ignored for `.safetensors`, which `neon.io.safetensors.iterate` streams instead.

    Returns:
        A `Container`. Raises `NeonError` (one line) if the file is missing, unreadable, or holds
        no state dict at any of the format's weight keys.
    """
    path = os.fspath(path)
    if fmt.folder_weights and os.path.isdir(path):
        return folder.read(path, fmt.folder_weights, mmap)
    _check_input_file(path)
    kind = format_of(path)
    metadata = {}
    if kind == "pkl":
        data = _read_pickle(path, fmt)
    elif kind == "safetensors":  # plain tensors: θ is the whole file, whatever the format says
        names, metadata = safetensors.header(path)
        data = dict(safetensors.iterate(path, list(names)))
        return Container(path, kind, data, locate(path, data, [()]), metadata)
    else:
        data = _torch_load(path, mmap)
        if not isinstance(data, dict):
            raise NeonError(
                f"cannot read checkpoint {path}: top level is a {type(data).__name__}, not a dict"
            )
    return Container(path, kind, data, locate(path, data, fmt.weight_keys), metadata)


def peek(path: str) -> dict:
    """The top-level dict of a `.pt`/`.pth` file, tensors memory-mapped (nothing is read until
    touched), without locating θ: for reading the entries a file records about itself."""
    path = os.fspath(path)
    _check_input_file(path)
    data = _torch_load(path, mmap=True)
    return data if isinstance(data, dict) else {}


def _check_input_file(path: str) -> None:
    if not os.path.exists(path):
        raise NeonError(f"no such checkpoint: {path}")
    if os.path.isdir(path):
        raise NeonError(f"{path} is a directory, not a checkpoint file")


def _torch_load(path: str, mmap: bool = False):
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = _load(path, mmap)
    except Exception as e:
        raise NeonError(f"cannot read checkpoint {path}: {first_sentence(e)}") from None
    return _without_namespaces(data)


def _load(path: str, mmap: bool):
    """`torch.load` with `weights_only=True` onto the CPU, memory-mapped with `mmap` where the file
    allows it: a legacy (non-zip) `torch.save` file, or a file system that cannot map, is read."""
    if mmap and zipfile.is_zipfile(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, OSError):  # mapping refused: read it as a whole below
            pass
    return torch.load(path, map_location="cpu", weights_only=True)


def _without_namespaces(obj):
    """`obj` with every argparse.Namespace replaced by the dict of its attributes."""
    if isinstance(obj, argparse.Namespace):
        return {k: _without_namespaces(v) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {k: _without_namespaces(v) for k, v in obj.items()} if any(
            isinstance(v, (argparse.Namespace, dict, list)) for v in obj.values()) else obj
    if isinstance(obj, list):
        return [_without_namespaces(v) for v in obj]
    return obj


def read_state(path: str, mmap: bool = False) -> dict:
    """A training-state file (optimizer, scaler, data position) as the dict it holds, loaded with
    `weights_only=True` (memory-mapped with `mmap`: tensors are read when touched, and processes of one
    machine share the pages); NeonError (one line) when it is missing or unreadable."""
    if not os.path.exists(path):
        raise NeonError(f"no such state file: {path}")
    try:
        data = _load(path, mmap)
    except Exception as e:
        raise NeonError(f"cannot read state file {path}: {first_sentence(e)}") from None
    if not isinstance(data, dict):
        raise NeonError(f"cannot read state file {path}: top level is a {type(data).__name__}, not a dict")
    return data


def locate(path: str, data: dict, weight_keys: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    """The first of `weight_keys` at which `data` holds a state dict; NeonError naming the
    top-level keys when none does."""
    for key in weight_keys:
        node = data
        for k in key:
            node = node.get(k) if isinstance(node, Mapping) else None
        if _is_state_dict(node):
            return key
    keys = ", ".join(map(str, list(data)[:10])) + (", ..." if len(data) > 10 else "")
    raise NeonError(f"{path}: no state dict found (top-level keys: {keys or 'none'})")


def _is_state_dict(node) -> bool:
    return (isinstance(node, Mapping) and len(node) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in node.items()))


def replaced(container: Container, state_dict: Mapping[str, torch.Tensor]) -> object:
    """A new data object in `container`'s layout with `state_dict` at `weights_key`.

    The dicts enclosing the state dict are shallow-copied; every other entry is the same object
    as in `container.data`, which is left unchanged.
    """
    if not container.weights_key:
        return state_dict
    data = copy.copy(container.data)
    node = data
    for key in container.weights_key[:-1]:
        node[key] = copy.copy(node[key])
        node = node[key]
    node[container.weights_key[-1]] = state_dict
    return data


def write(obj: object, path: str) -> None:
    """`torch.save(obj)` to `path` atomically (parent directories are created). An I/O error (a full
    disk, a quota) is raised as the OSError it is, naming `path`, with no file left: torch's own
    writer would report it as `RuntimeError: [enforce fail at inline_container.cc] unexpected pos`,
    so the bytes go through a file object of ours that keeps the OSError."""
    with files.atomic(path) as tmp, open(tmp, "wb") as f:
        sink = _Sink(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


class _Sink:
    """A writable file object for `torch.save` that remembers the OSError of a failed write."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def in_memory(state_dict: Mapping[str, torch.Tensor]) -> io.BytesIO:
    """`state_dict` serialized as `write` would write it, in a rewound in-memory file.

    For libraries that insist on calling `torch.load` themselves (torch-fidelity's InceptionV3
    takes a weights path or file object and loads it with `weights_only=False`): read the file with
    `read` (`weights_only=True`) and hand the library these bytes, which hold plain tensors only.
    """
    buffer = io.BytesIO()
    torch.save(dict(state_dict), buffer)
    buffer.seek(0)
    return buffer


def output_format(base_format: str, path: str, format: str = "same") -> str:
    """The format `write_like` writes for a `base_format` container: 'pt' or 'safetensors'.

    Raises `NeonError` if `format` is not 'same' or 'safetensors', or the suffix of `path` does
    not name the format written, so callers can refuse a bad output name before any work.
    """
    if format not in ("same", "safetensors"):
        raise NeonError(f"unknown output format {format!r} (expected 'same' or 'safetensors')")
    if base_format == "folder" and format == "same":  # a folder: any name that is not an existing file
        if os.path.isfile(path):
            raise NeonError(f"{path} is a file; the output is a folder")
        return "folder"
    fmt = "safetensors" if format == "safetensors" or base_format == "safetensors" else "pt"
    if format_of(path) != fmt:
        suffix = ".safetensors" if fmt == "safetensors" else ".pt"
        raise NeonError(f"{path}: the output is written as {fmt}, so its name must end in {suffix}")
    return fmt


def write_like(container: Container, state_dict: Mapping[str, torch.Tensor], path: str,
               format: str = "same") -> None:
    """Write `state_dict` as θ of a checkpoint shaped like `container`, atomically.

    Args:
        format: 'same' keeps the container's layout and format (for `.pt`, every non-weight
            entry is kept; for `.safetensors`, the metadata is kept). 'safetensors' writes the
            plain tensors to a `.safetensors` file whatever the container was.
        path: its suffix must match the format written (`.pt`/`.pth` or `.safetensors`); a folder
            container writes a folder (`neon.io.folder.write`) of any name.
    """
    kind = output_format(container.format, path, format)
    if kind == "folder":
        folder.write(container, state_dict, path)
    elif kind == "pt":
        write(replaced(container, state_dict), path)
    else:
        specs = [(name, t.dtype, tuple(t.shape)) for name, t in state_dict.items()]
        safetensors.write(path, specs, state_dict.values(), container.metadata)



def _read_pickle(path: str, fmt: Format) -> dict:
    """A `.pkl` as the plain dict `fmt.from_pickle` makes of it (`neon.io.unpickle`)."""
    return unpickle.read(path, {**unpickle.TENSOR_GLOBALS, **fmt.pickle_globals}, fmt.from_pickle)
