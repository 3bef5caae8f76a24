"""`.safetensors` files streamed one tensor at a time: the header, a reader and a writer.

Reading goes through the safetensors library (a mapping opened per tensor, so resident memory is the
tensor being handled, not the file); writing is ours, from a stream of tensors after a header built
from their specs, so a merge of two multi-GiB checkpoints holds one tensor at a time.
"""

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from neon.errors import NeonError, first_sentence
from neon.io import files

# safetensors dtype codes. Reading goes through the safetensors library; `write` is ours
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


def _safe_open(path: str):
    """The safetensors library's reader of `path`, its errors as one-line NeonErrors."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise NeonError(f"no such checkpoint: {path}")
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise NeonError(f"cannot read checkpoint {path}: {first_sentence(e)}") from None


def header(path: str) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], dict]:
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
                raise NeonError(
                    f"cannot read checkpoint {path}: {name!r} has dtype {code}, which neon does not read"
                )
            header[name] = (_ST_DTYPES[code], tuple(part.get_shape()))
        return header, dict(f.metadata() or {})


def iterate(path: str, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` from a `.safetensors` file, one tensor in memory at a time.

    Each tensor is read by the safetensors library from a mapping opened for it alone and closed
    before it is yielded, so resident memory is the tensor being handled, not the file (a mapping
    kept open would keep every page read so far resident). Order: file order, or the order of
    `names`. The header is checked (and unknown names refused) when this is called, before any
    data is read.
    """
    specs, _ = header(path)
    names = list(specs) if names is None else list(names)
    unknown = [name for name in names if name not in specs]
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
            raise NeonError(f"cannot read checkpoint {path}: {first_sentence(e)}") from None
        yield name, tensor
        del tensor  # let the caller's copy be the only reference while the next one is read


def write(path: str, specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
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
    with files.atomic(path) as tmp, open(tmp, "wb") as f:
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
