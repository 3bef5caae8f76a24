"""Folder checkpoints: a pipeline folder of several components whose θ is one component's weights file.

A family declares where θ's file may sit (`Format.folder_weights`, in order of preference). `read`
reads that file (`.safetensors`, or a `.pt`/`.bin` read with `weights_only`) plus the folder's own
record (`FOLDER_RECORD`: `family`, `images_seen`) into a `Container`; `write` writes a new folder shaped
like it, atomically: the other files linked (copied across file systems), θ as safetensors, the record
as JSON. Names no family.
"""

import json
import os
import shutil
from collections.abc import Mapping, Sequence

import torch

from neon.errors import NeonError, first_sentence
from neon.io import checkpoint, files, safetensors


def read(path: str, weights_paths: Sequence[str], mmap: bool = False):
    """The folder checkpoint at `path`: θ from the first of `weights_paths` that exists, plus the entries
    of its `checkpoint.FOLDER_RECORD`, as a `checkpoint.Container` of format 'folder'."""
    found = [rel for rel in weights_paths if os.path.isfile(os.path.join(path, rel))]
    if not found:
        raise NeonError(f"{path}: no weights file in this folder (looked for {', '.join(weights_paths)})")
    inner = checkpoint.read(os.path.join(path, found[0]), checkpoint.GENERIC, mmap)
    data = {}
    record = os.path.join(path, checkpoint.FOLDER_RECORD)
    if os.path.isfile(record):
        try:
            with open(record, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise NeonError(f"cannot read {record}: {first_sentence(e)}") from None
        if not isinstance(data, dict):
            raise NeonError(f"cannot read {record}: not a JSON object")
    data[found[0]] = inner.weights
    return checkpoint.Container(
        path, "folder", data, (found[0],), inner.metadata, replaces=tuple(weights_paths)
    )


def write(container, state_dict: Mapping[str, torch.Tensor], path: str) -> None:
    """Write a folder checkpoint shaped like `container`, atomically (`files.atomic_folder`).

    Every file of `container.path` but those θ replaces is hard-linked (copied where links fail:
    another file system); then `container.files` are written, θ as `.safetensors` at its relative
    path (the suffix changed to `.safetensors`, with the container's metadata), and the entries of
    `container.data` besides θ as `FOLDER_RECORD`. Linked files share their bytes with the source:
    a tool that rewrites one in place rewrites both.
    """
    rel = container.weights_key[0]
    target = os.path.splitext(rel)[0] + ".safetensors"
    record = {k: v for k, v in container.data.items() if k != rel}
    with files.atomic_folder(path) as tmp:
        if container.path is not None:
            _link_tree(container.path, tmp, {os.path.normpath(r) for r in
                                             (*container.replaces, rel, checkpoint.FOLDER_RECORD)})
        for relative, content in container.files.items():
            dst = os.path.join(tmp, relative)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if isinstance(content, Mapping):
                _write_tensors(dst, content)
            else:
                with open(dst, "wb") as f:
                    f.write(content.encode() if isinstance(content, str) else content)
        dst = os.path.join(tmp, target)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        _write_tensors(dst, state_dict, container.metadata)
        if record:
            with open(os.path.join(tmp, checkpoint.FOLDER_RECORD), "w", encoding="utf-8") as f:
                json.dump(record, f, indent=2)
                f.write("\n")


def _link_tree(source: str, dest: str, skip: set[str]) -> None:
    """Hard-link every file of `source` below `dest` (copy where a link fails), but `skip` and dotfiles."""
    for root, _, names in os.walk(source):
        for name in names:
            src = os.path.join(root, name)
            relative = os.path.normpath(os.path.relpath(src, source))
            if relative in skip or name.startswith("."):
                continue
            dst = os.path.join(dest, relative)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                os.link(os.path.realpath(src), dst)
            except OSError:
                shutil.copyfile(src, dst)


def _write_tensors(
    path: str, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
):
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in state_dict.items()]
    safetensors.write(path, specs, state_dict.values(), metadata)
