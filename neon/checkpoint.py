"""Every read and write of weights, and every atomic file write of the project.

This is the only module that calls `torch.load`, `torch.save`, pickle, safetensors I/O or
`os.replace`. It offers mechanisms and names no family: families declare their files in a `Format`
(where θ sits in their containers, the globals their pickles may reference, how an unpickled
object becomes plain data), and `read` applies it. It reads `.pt`/`.pth` files (always
`weights_only=True`, `argparse.Namespace` allowed as data), `.safetensors` files (streamed through
the safetensors library, one tensor at a time) and `.pkl` files (a restricted unpickler that
resolves only the globals of the format's allowlist and never runs code from the file) into a
`Container` that remembers where θ lives, writes a new θ back in the same layout (`write_like`),
and provides `atomic`, the temp-file-then-rename pattern every other module uses for its outputs,
so an interrupted run never leaves a partial file under a final name.
"""

import argparse
import collections
import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import secrets
import shutil
import socket
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from neon.errors import NeonError

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class Format:
    """What a family declares about its checkpoint files; `read` applies it.

    weight_keys: where θ may sit in a container, as paths of dict keys, in order of preference
        (the EMA first wherever a file has one: the network the paper samples from and merges).
    pickle_globals: the globals a `.pkl` of the family may reference, (module, name) → the object
        to use instead, on top of `TENSOR_GLOBALS`; everything else is refused.
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
_SUFFIXES = {".pt": "pt", ".pth": "pt", ".ckpt": "pt", ".bin": "pt", ".safetensors": "safetensors", ".pkl": "pkl"}
# A folder checkpoint's entries besides θ (`images_seen`, `family`), as JSON inside the folder.
FOLDER_RECORD = "neon.json"

# safetensors dtype codes. Reading goes through the safetensors library; `write_safetensors` is ours
# because the library's writer needs every tensor in memory at once. Data is little-endian; like the
# library, the writer assumes a little-endian host and copies bytes as they are.
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_CODES = {dtype: code for code, dtype in _ST_DTYPES.items()}


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
        raise NeonError(f"{path}: unknown checkpoint format (expected .pt, .pth, .ckpt, .safetensors or .pkl)")
    return _SUFFIXES[suffix]


def read(path: str, fmt: Format = GENERIC, mmap: bool = False) -> Container:
    """Read a checkpoint file and locate θ in it with `fmt.weight_keys`.

    Args:
        path: a `.pt`/`.pth` file (loaded with `weights_only=True` onto the CPU; an
            `argparse.Namespace` inside, such as a training script's `args`, becomes a dict), a
            `.safetensors` file, or a `.pkl` read through `fmt`'s restricted unpickler.
        fmt: the family's `Format` (default: `GENERIC`).
        mmap: map `.pt` tensors from the file instead of reading them (pages load on first
            touch). Ignored for `.safetensors`, which `iter_safetensors` streams instead.

    Returns:
        A `Container`. Raises `NeonError` (one line) if the file is missing, unreadable, or holds
        no state dict at any of the format's weight keys.
    """
    path = os.fspath(path)
    if fmt.folder_weights and os.path.isdir(path):
        return _read_folder(path, fmt, mmap)
    _check_input_file(path)
    kind = format_of(path)
    metadata = {}
    if kind == "pkl":
        data = _read_pickle(path, fmt)
    elif kind == "safetensors":  # plain tensors: θ is the whole file, whatever the format says
        names, metadata = safetensors_header(path)
        data = dict(iter_safetensors(path, list(names)))
        return Container(path, kind, data, locate(path, data, [()]), metadata)
    else:
        data = _torch_load(path, mmap)
        if not isinstance(data, dict):
            raise NeonError(f"cannot read checkpoint {path}: top level is a {type(data).__name__}, not a dict")
    return Container(path, kind, data, locate(path, data, fmt.weight_keys), metadata)


def _read_folder(path: str, fmt: Format, mmap: bool) -> Container:
    """A folder checkpoint: θ from the first of `fmt.folder_weights` that exists, plus the entries of
    its `FOLDER_RECORD`."""
    found = [rel for rel in fmt.folder_weights if os.path.isfile(os.path.join(path, rel))]
    if not found:
        raise NeonError(f"{path}: no weights file in this folder (looked for {', '.join(fmt.folder_weights)})")
    inner = read(os.path.join(path, found[0]), GENERIC, mmap)
    data = {}
    record = os.path.join(path, FOLDER_RECORD)
    if os.path.isfile(record):
        try:
            with open(record, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise NeonError(f"cannot read {record}: {_short(e)}") from None
        if not isinstance(data, dict):
            raise NeonError(f"cannot read {record}: not a JSON object")
    data[found[0]] = inner.weights
    return Container(path, "folder", data, (found[0],), inner.metadata, replaces=tuple(fmt.folder_weights))


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
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise NeonError(f"cannot read checkpoint {path}: {_short(e)}") from None
    return _without_namespaces(data)


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


def read_state(path: str) -> dict:
    """A training-state file (optimizer, scaler, data position) as the dict it holds, loaded with
    `weights_only=True`; NeonError (one line) when it is missing or unreadable."""
    if not os.path.exists(path):
        raise NeonError(f"no such state file: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise NeonError(f"cannot read state file {path}: {_short(e)}") from None
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


def _short(e: object) -> str:
    """The first sentence of an error message, for a one-line NeonError."""
    text = str(e)
    # torch's weights_only errors run to a dozen lines; the reason follows this marker.
    marker = "WeightsUnpickler error:"
    prefix = ""
    if marker in text:
        text, prefix = text.split(marker, 1)[1], "weights_only=True refused it: "
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0].split(". ")[0] if lines else type(e).__name__
    line = prefix + line
    return line if len(line) <= 200 else line[:197] + "..."


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
    """`torch.save(obj)` to `path` atomically (parent directories are created)."""
    with atomic(path) as tmp:
        torch.save(obj, tmp)


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
            container writes a folder (`write_folder`) of any name.
    """
    kind = output_format(container.format, path, format)
    if kind == "folder":
        write_folder(container, state_dict, path)
    elif kind == "pt":
        write(replaced(container, state_dict), path)
    else:
        specs = [(name, t.dtype, tuple(t.shape)) for name, t in state_dict.items()]
        write_safetensors(path, specs, state_dict.values(), container.metadata)


def write_folder(container: Container, state_dict: Mapping[str, torch.Tensor], path: str) -> None:
    """Write a folder checkpoint shaped like `container`, atomically (a temporary folder renamed).

    Every file of `container.path` but those θ replaces is hard-linked (copied where links fail:
    another file system); then `container.files` are written, θ as `.safetensors` at its relative
    path (the suffix changed to `.safetensors`, with the container's metadata), and the entries of
    `container.data` besides θ as `FOLDER_RECORD`. Linked files share their bytes with the source:
    a tool that rewrites one in place rewrites both.
    """
    rel = container.weights_key[0]
    target = os.path.splitext(rel)[0] + ".safetensors"
    record = {k: v for k, v in container.data.items() if k != rel}
    with atomic_folder(path) as tmp:
        if container.path is not None:
            skip = {os.path.normpath(r) for r in (*container.replaces, rel, FOLDER_RECORD)}
            for root, _, names in os.walk(container.path):
                for name in names:
                    src = os.path.join(root, name)
                    relative = os.path.normpath(os.path.relpath(src, container.path))
                    if relative in skip or name.startswith("."):
                        continue
                    dst = os.path.join(tmp, relative)
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    try:
                        os.link(os.path.realpath(src), dst)
                    except OSError:
                        shutil.copyfile(src, dst)
        for relative, content in container.files.items():
            dst = os.path.join(tmp, relative)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if isinstance(content, Mapping):
                specs = [(name, t.dtype, tuple(t.shape)) for name, t in content.items()]
                write_safetensors(dst, specs, content.values())
            else:
                with open(dst, "wb") as f:
                    f.write(content.encode() if isinstance(content, str) else content)
        dst = os.path.join(tmp, target)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        specs = [(name, t.dtype, tuple(t.shape)) for name, t in state_dict.items()]
        write_safetensors(dst, specs, state_dict.values(), container.metadata)
        if record:
            with open(os.path.join(tmp, FOLDER_RECORD), "w", encoding="utf-8") as f:
                json.dump(record, f, indent=2)
                f.write("\n")


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """`atomic` for a folder: yield a temporary folder next to `path`; on success it replaces `path`
    (a folder already there is moved aside first and removed after), on an exception it is removed."""
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(directory, name)
    tmp = os.path.join(directory, f".{name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    os.makedirs(tmp)
    try:
        yield tmp
        old = None
        if os.path.isdir(path):
            old = os.path.join(directory, f".{name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic(path: str) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success rename it onto `path`.

    On an exception the temporary file is removed and the exception re-raised, so `path` is
    either untouched or complete. The temporary name starts with '.' (snapshot globs skip it)
    and ends with the suffix of `path` (numpy's `savez` would otherwise append '.npz').
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(name)[1]
    remove_stale_temporaries(directory, name)
    tmp = os.path.join(directory, f".{name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


_HOST = socket.gethostname().replace(".", "_").replace("-", "_") or "host"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)-[0-9a-f]{8}\.tmp(\.[^.]*)?$")


def remove_stale_temporaries(directory: str, name: str | None = None) -> list[str]:
    """Remove the temporaries `atomic` left in `directory` (for `name`, or any) when the process that
    wrote them, on this host, is gone (a killed merge or sample). Returns the removed paths."""
    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry)
        if not match or (name is not None and match["name"] != name) or match["host"] != _HOST:
            continue
        if _alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            stale = os.path.join(directory, entry)
            if os.path.isdir(stale) and not os.path.islink(stale):  # left by `atomic_folder`
                shutil.rmtree(stale)
            else:
                os.remove(stale)
            removed.append(os.path.join(directory, entry))
            logger.info("removed %s, left by an interrupted run", removed[-1])
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output(path: str, kind: str, suffixes: Sequence[str] = ()) -> None:
    """Refuse, before any work, an output path that cannot be written: `kind` 'dir' (a folder that
    may exist) or 'file' (a file that may exist, not a folder; with one of `suffixes` when given). A
    missing parent folder is fine (it is created) unless a file stands in its way or the nearest
    existing one is not writable."""
    path = os.fspath(path)
    if not path:
        raise NeonError("an output path is empty")
    if kind == "dir" and os.path.exists(path) and not os.path.isdir(path):
        raise NeonError(f"{path} exists and is not a directory; choose another output folder")
    if kind == "file":
        if os.path.isdir(path):
            raise NeonError(f"{path} is a directory; the output is a file")
        if suffixes and not path.lower().endswith(tuple(suffixes)):
            raise NeonError(f"{path}: the output file must end in {' or '.join(suffixes)}")
    parent = os.path.abspath(path if kind == "dir" else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NeonError(f"cannot create {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):  # (root passes; its failures come as OSError at creation)
        raise NeonError(f"cannot create {path}: {parent} is not writable")


LOCK = ".neon.lock"
BOOKKEEPING = {LOCK, "config.resolved.yaml", "log.txt"}  # files that hold no work of a run


@contextlib.contextmanager
def claim(directory: str, command: str, keep_on_error: Callable[[str], bool] = lambda name: True):
    """Hold the output folder `directory` for one writer: creates it when missing, takes an advisory
    lock (`.neon.lock`, holding the writer's host, pid and command; a second writer gets a NeonError
    naming it) and releases it at the end. On an exception, a folder this call created is removed
    again when it holds nothing but bookkeeping and files for which `keep_on_error(name)` is false,
    so a failed first run leaves nothing behind. Not collective: call it on one rank."""
    check_output(directory, "dir")
    created = not os.path.exists(directory)
    os.makedirs(directory, exist_ok=True)
    lock_path = os.path.join(directory, LOCK)
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        try:
            info = json.loads(holder)
            who = f"{info['command']} (pid {info['pid']} on {info['host']})"
        except (ValueError, KeyError, TypeError):
            who = "another neon process"
        raise NeonError(f"{directory} is in use by {who}; wait for it to finish or choose another output") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    handle.flush()
    try:
        yield directory
    except BaseException:
        _release(lock_path, handle)
        if created:
            left = [n for n in os.listdir(directory) if n not in BOOKKEEPING and keep_on_error(n)]
            if not left:
                shutil.rmtree(directory, ignore_errors=True)
        raise
    _release(lock_path, handle)


def _release(lock_path: str, handle) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(lock_path)
    handle.close()


def write_json(path: str, obj: object) -> None:
    """Write `obj` as indented JSON with a trailing newline, atomically."""
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def append_jsonl(path: str, record: dict) -> None:
    """Append `record` as one JSON line (NaN and ±inf written as null) in one `write` call on an
    O_APPEND descriptor, so a crash leaves at most a torn last line, which `read_jsonl` drops."""
    line = json.dumps(finite_json(record), allow_nan=False) + "\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size and not _ends_with_newline(fd):
            line = "\n" + line  # a torn line before us stays on a line of its own
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file written by `append_jsonl` ([] when there is none). A line that
    does not parse (the torn tail of an interrupted append) is skipped with a warning."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                logger.warning("%s: line %d is not a JSON record (an interrupted write?); skipped", path, number)
                continue
            records.append(record)
    return records


def finite_json(value):
    """A JSON-able `value` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def _ends_with_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return os.pread(fd, 1, size - 1) == b"\n"


def sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks; of a folder, the SHA-256 of its files' relative
    paths and digests, in sorted order (links followed)."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, names in os.walk(path, followlinks=True):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(root, name)
                digest.update(f"{os.path.relpath(full, path)}\0{sha256(full)}\n".encode())
        return digest.hexdigest()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_open(path: str):
    """The safetensors library's reader of `path`, its errors as one-line NeonErrors."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise NeonError(f"no such checkpoint: {path}")
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise NeonError(f"cannot read checkpoint {path}: {_short(e)}") from None


def safetensors_header(path: str) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], dict]:
    """Names, dtypes and shapes of a `.safetensors` file, in file order, plus its metadata.

    Reads only the header (through the safetensors library). Raises `NeonError` if the file is
    missing, its header is invalid, or it holds a dtype torch has no name for here.
    """
    with _safe_open(path) as f:
        header = {}
        for name in f.offset_keys():
            part = f.get_slice(name)
            code = part.get_dtype()
            if code not in _ST_DTYPES:
                raise NeonError(f"cannot read checkpoint {path}: {name!r} has dtype {code}, which neon does not read")
            header[name] = (_ST_DTYPES[code], tuple(part.get_shape()))
        return header, dict(f.metadata() or {})


def iter_safetensors(path: str, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` from a `.safetensors` file, one tensor in memory at a time.

    Each tensor is read by the safetensors library from a mapping opened for it alone and closed
    before it is yielded, so resident memory is the tensor being handled, not the file (a mapping
    kept open would keep every page read so far resident). Order: file order, or the order of
    `names`. The header is checked (and unknown names refused) when this is called, before any
    data is read.
    """
    header, _ = safetensors_header(path)
    names = list(header) if names is None else list(names)
    unknown = [name for name in names if name not in header]
    if unknown:
        raise NeonError(f"{path}: no tensor named {', '.join(unknown[:5])}")
    return _read_safetensors(path, names)


def _read_safetensors(path: str, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError

    for name in names:
        try:
            with _safe_open(path) as f:
                tensor = f.get_tensor(name)
        except SafetensorError as e:
            raise NeonError(f"cannot read checkpoint {path}: {_short(e)}") from None
        yield name, tensor
        del tensor  # let the caller's copy be the only reference while the next one is read


def write_safetensors(path: str, specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                      tensors: Iterable[torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a `.safetensors` file from a stream of tensors, atomically.

    Args:
        specs: `(name, dtype, shape)` of every tensor, in the order they will arrive. The header
            (with all offsets) is written from these before any data.
        tensors: yields one tensor per spec, in order; each is checked against its spec and
            written as soon as it arrives, so peak memory is one tensor, not the file.
        metadata: the optional `__metadata__` (str -> str).
    """
    specs = [(name, dtype, tuple(int(d) for d in shape)) for name, dtype, shape in specs]
    header = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in specs:
        if dtype not in _ST_CODES:
            raise ValueError(f"{name}: {dtype} cannot be stored in safetensors")
        if name in header or name == "__metadata__":
            raise ValueError(f"duplicate or reserved tensor name {name!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the safetensors library does
    with atomic(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        stream = iter(tensors)
        for name, dtype, shape in specs:
            tensor = next(stream, None)
            if tensor is None:
                raise ValueError(f"the tensors ran out before {name!r}")
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise ValueError(f"{name}: got {tensor.dtype} {list(tensor.shape)}, "
                                 f"spec says {dtype} {list(shape)}")
            tensor = tensor.detach().cpu().contiguous()
            if tensor.numel():
                f.write(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
            del tensor
        if next(stream, None) is not None:
            raise ValueError(f"more tensors than the {len(specs)} specs")


def download(url: str, dest_dir: str) -> str:
    """Fetch `url` into `dest_dir` once and return the local path.

    A local path that exists is returned as it is. A URL (http(s)://, file://) is fetched with
    urllib into `dest_dir/<last path component>`, atomically, unless that file already exists.
    Not collective: wrap it in `distributed.main_first()` when every rank needs the file.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "" or os.path.exists(url):
        if not os.path.exists(url):
            raise NeonError(f"no such file: {url}")
        return url
    name = os.path.basename(urllib.parse.unquote(parsed.path))
    if not name:
        raise NeonError(f"cannot download {url}: the URL does not end in a file name")
    dest = os.path.join(dest_dir, name)
    if os.path.exists(dest):
        return dest
    logger.info("downloading %s to %s", url, dest)
    try:
        with atomic(dest) as tmp, urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, 2**20)
    except (OSError, ValueError) as e:
        reason = e.reason if type(e) is urllib.error.URLError else e  # HTTPError reads better whole
        raise NeonError(f"cannot download {url}: {_short(reason)}") from None
    return dest


# --- restricted unpickling ---------------------------------------------------------------------
#
# A `.pkl` is read by an unpickler that resolves only an allowlist of globals (the arcee-ai/mergekit
# `lazy_unpickle` pattern): tensor rebuilding and plain containers here, plus what the family's
# `Format.pickle_globals` adds. A family maps the classes its pickles name to `Record` types, so
# their objects arrive as data (class name + state) and no constructor, `__reduce__` or code
# carried by the file ever runs; its `from_pickle` then turns those records into plain dicts.


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
        raise pickle.UnpicklingError(f"refused {module}.{name}: not on the allowlist of this family's pickles")


def _read_pickle(path: str, fmt: Format) -> dict:
    """A `.pkl` as the plain dict `fmt.from_pickle` makes of it."""
    try:
        with open(path, "rb") as f:
            raw = _RestrictedUnpickler(f, {**TENSOR_GLOBALS, **fmt.pickle_globals}).load()
        if fmt.from_pickle is None:
            raise NeonError(f"cannot read network pickle {path}: no family format given for .pkl files "
                            f"(pass --family)")
        data = fmt.from_pickle(raw)
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, RuntimeError, KeyError) as e:
        raise NeonError(f"cannot read network pickle {path}: {_short(e)}") from None
    if not isinstance(data, dict):
        raise NeonError(f"cannot read network pickle {path}: top level is a {type(data).__name__}, not a dict")
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
                raise pickle.UnpicklingError(f"unexpected module {prefix + name} of type {type(child).__name__}")
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
