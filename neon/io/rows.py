"""`.npz` members read row by row: synthetic-set shards and reference files without loading them whole.

An uncompressed member (`np.savez`) is a `RowFile`, read on demand with `os.pread`, so a 147 GB
synthetic set never sits in memory; a compressed one (`np.savez_compressed`) is read whole under a size
limit. Headers are read alone (`npz_header`) so limits are checked before any data.
"""

import math
import os
import struct
import zipfile

import numpy as np

from neon.errors import NeonError


class RowFile:
    """An array stored uncompressed in a file, read row by row on demand with `os.pread`: indexing
    with an int, a slice or an index array returns an ndarray of just those rows. (A memory map
    would do the same reads, but its pages count toward the process's resident memory as they are
    touched, about a megabyte a random row here, through the kernel's read-around.)"""

    def __init__(self, path: str, offset: int, shape: tuple, dtype: np.dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)
        self.row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self._read_run(start, max(stop - start, 0))
            index = np.arange(start, stop, step)
        if np.isscalar(index):
            return self[np.array([index])][0]
        rows = np.asarray(index, dtype=np.int64)
        if len(rows) > 1 and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
            return self._read_run(int(rows[0]), len(rows))  # consecutive rows: one read
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        with open(self.path, "rb", buffering=0) as f:
            for k, row in enumerate(rows.tolist()):
                out[k] = self._read(f, row, 1)[0]
        return out

    def _read_run(self, start: int, count: int) -> np.ndarray:
        with open(self.path, "rb", buffering=0) as f:
            return self._read(f, start, count)

    def _read(self, f, start: int, count: int) -> np.ndarray:
        data = os.pread(f.fileno(), count * self.row_bytes, self.offset + start * self.row_bytes)
        if len(data) != count * self.row_bytes:
            raise NeonError(f"{self.path} is truncated")
        return np.frombuffer(data, dtype=self.dtype).reshape(count, *self.shape[1:])


MAX_IN_MEMORY = 8 * 2**30
"""The largest `.npz` member read whole (a compressed one, which cannot be streamed): 8 GiB."""


def npz_header(path: str, key: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) that member `key` of an `.npz` declares, read from its header alone."""
    return _npz_member(path, key)[1:3]


def npz_array(path: str, key: str, max_bytes: int = MAX_IN_MEMORY):
    """Member `key` of an `.npz`: a `RowFile` reading rows on demand when it is stored uncompressed
    (np.savez), else the array read whole (np.savez_compressed) when it declares at most `max_bytes`.
    NeonError (one line) when the file or member is unreadable, truncated or too large."""
    info, shape, dtype, fortran, data_start = _npz_member(path, key)
    declared = math.prod(shape) * dtype.itemsize
    if info.compress_type != zipfile.ZIP_STORED or fortran or dtype.hasobject:
        if declared > max_bytes:
            raise NeonError(
                f"{path}[{key!r}] declares {list(shape)} {dtype} ({declared / 2**30:,.1f} GiB), above the "
                f"limit of {max_bytes / 2**30:.0f} GiB read whole; store it uncompressed (np.savez) to "
                f"stream it"
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                return np.ascontiguousarray(data[key])
        except (OSError, ValueError) as e:
            raise NeonError(f"cannot read {path}[{key!r}]: {e}") from None
    # An uncompressed member's bytes sit in the file as they are, after its local header (30 bytes +
    # name + extra field) and the .npy header.
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    offset = info.header_offset + 30 + name_len + extra_len + data_start
    if offset + declared > os.path.getsize(path):
        raise NeonError(
            f"{path}[{key!r}] is truncated: it declares {list(shape)} {dtype} but the file is shorter"
        )
    if math.prod(shape) == 0:
        return np.empty(shape, dtype=dtype)
    return RowFile(path, offset, shape, dtype)


def _npz_member(path: str, key: str):
    """(zip info, shape, dtype, fortran order, data offset within the member) of member `key`."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(key + ".npy")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(member)
                data_start = member.tell()
    except KeyError:
        raise NeonError(f"{path} has no array {key!r}") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise NeonError(f"cannot read {path}: {e}") from None
    return info, tuple(shape), dtype, fortran, data_start
