"""Image sources for the metrics: a folder of PNG/JPEG files, an `.npz` of uint8 images, or a
synthetic set directory, all read lazily in batches of uint8 [B,3,H,W].

Every rank opens the same source and reads only the indices it is given, so a 50k-image source
is never held whole by any process:
* a folder: its `.png`/`.jpg`/`.jpeg` files (not recursive), sorted by file name as
  torch-fidelity sorts them. Files are converted to RGB as torch-fidelity does (8-bit grayscale,
  palette and CMYK JPEGs are common in ImageNet); alpha channels and 16-bit images are refused.
* an `.npz`: the uint8 [N,H,W,3] array under `samples` (our synthetic shards) or `arr_0` (ADM's
  reference batches, `np.savez(path, images)`). Uncompressed members (np.savez) are
  memory-mapped, compressed ones (np.savez_compressed) are read whole.
* a synthetic set (a directory with `manifest.json`, DESIGN.md "Synthetic set"): its samples in
  order, through `neon.synthetic.read` (the one reader: shard hashes checked, shards memory-mapped).
  It must be complete and hold images, not the toy's points.

`labels` gives the class labels of an `.npz` that has them (`neon diagnose` needs them for
class-conditional models).
"""

import os
import zipfile

import numpy as np
import torch
from PIL import Image

from neon import synthetic
from neon.errors import NeonError
from neon.io import rows

EXTENSIONS = (".png", ".jpg", ".jpeg")
NPZ_KEYS = ("samples", "arr_0")  # in order of preference
LABELS_KEY = "labels"  # as our synthetic shards name them

# PIL modes that convert to 8-bit RGB without losing information, as torch-fidelity's
# `Image.open(path).convert("RGB")` does for them. Others (RGBA, LA, I;16, F, ...) are refused.
_CONVERTIBLE = ("RGB", "L", "P", "CMYK", "YCbCr")


class Images:
    """N images of one size (`shape` = (3, H, W)), read by index from uint8 [n,H,W,3] `arrays`
    (memory maps) that follow each other, from image `files`, or from a synthetic set `synthetic`."""

    def __init__(self, name: str, shape: tuple[int, int, int], arrays: list | None = None,
                 files: list[str] | None = None, synthetic=None):
        self.name, self.shape, self._arrays, self._files = name, tuple(shape), arrays or [], files
        self._synthetic = synthetic
        self._starts = np.cumsum([0] + [len(a) for a in self._arrays])

    def __len__(self) -> int:
        if self._synthetic is not None:
            return len(self._synthetic)
        return len(self._files) if self._files is not None else int(self._starts[-1])

    def read(self, indices: range) -> torch.Tensor:
        """uint8 [len(indices),3,H,W] on the CPU."""
        if self._synthetic is not None:
            return self._synthetic.read(indices)
        if self._files is not None:
            batch = np.stack([self._decode(self._files[i]) for i in indices])
        else:
            parts = []
            for j, array in enumerate(self._arrays):
                lo, hi = max(indices.start, self._starts[j]), min(indices.stop, self._starts[j + 1])
                if lo < hi:
                    parts.append(np.asarray(array[lo - self._starts[j]:hi - self._starts[j]]))
            batch = np.concatenate(parts)
        return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()

    def _decode(self, path: str) -> np.ndarray:
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except OSError as e:
            raise NeonError(f"cannot read image {path}: {e}") from None


def source(path: str) -> Images:
    """Open an image source (see the module docstring); NeonError (one line) when it is missing,
    empty, or holds anything but uint8 images with 3 channels."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, synthetic.MANIFEST)):
            return _synthetic(path)
        return _folder(path)
    if os.path.isfile(path) and path.lower().endswith(".npz"):
        array = _npz_images(path)
        return Images(path, (3, *array.shape[1:3]), [array])
    if not os.path.exists(path):
        raise NeonError(f"no such image source: {path}")
    raise NeonError(
        f"{path}: images must be a folder of PNG/JPEG files, an .npz of uint8 images or a synthetic set"
    )


def labels(path: str, num: int) -> torch.Tensor | None:
    """int64 [num]: the `labels` array of an `.npz` source with `num` images (1-D, integer, ≥ 0),
    as `np.savez(path, arr_0=images, labels=classes)` writes it; None for sources without labels."""
    path = os.fspath(path)
    if not (os.path.isfile(path) and path.lower().endswith(".npz")):
        return None
    with np.load(path, allow_pickle=False) as data:
        if LABELS_KEY not in data.files:
            return None
        found = data[LABELS_KEY]
    if (
        found.ndim != 1
        or len(found) != num
        or not np.issubdtype(found.dtype, np.integer)
        or (found < 0).any()
    ):
        raise NeonError(f"{path}[{LABELS_KEY!r}] must be {num} class labels (integers >= 0), "
                        f"got {found.dtype} of shape {list(found.shape)}")
    return torch.from_numpy(found.astype(np.int64))


def _folder(path: str) -> Images:
    files = sorted(os.path.join(path, name) for name in os.listdir(path)
                   if name.lower().endswith(EXTENSIONS) and os.path.isfile(os.path.join(path, name)))
    if not files:
        raise NeonError(f"{path} holds no images (.png, .jpg or .jpeg files)")
    # Every header is checked here (PIL reads only the header on open), so a bad file fails the
    # command before any rank starts, not one rank in the middle of a collective.
    size = None
    for name in files:
        try:
            with Image.open(name) as image:
                mode, this = image.mode, image.size
        except OSError as e:
            raise NeonError(f"cannot read image {name}: {e}") from None
        if mode not in _CONVERTIBLE:
            raise NeonError(f"{name}: a {mode} image; the metrics take 8-bit RGB (no alpha)")
        size = size or this
        if this != size:
            raise NeonError(f"{name} is {this[0]}x{this[1]}, but {files[0]} is {size[0]}x{size[1]}; "
                            f"all images of {path} need one size")
    return Images(path, (3, size[1], size[0]), files=files)


def _synthetic(path: str) -> Images:
    """A synthetic set, through the one reader of `neon.synthetic` (its shards' hashes checked)."""
    data = synthetic.read(path)
    if not data.holds_images:
        raise NeonError(f"{path} holds {data.manifest.get('family')} samples of shape "
                        f"{data.manifest.get('sample_shape')}, not images")
    if len(data) == 0:
        raise NeonError(f"{path} holds no images")
    return Images(path, (3, *data.manifest["sample_shape"][:2]), synthetic=data)


def _npz_images(path: str) -> np.ndarray:
    """The images array of an `.npz` (NHWC uint8; memory-mapped when stored uncompressed)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [name[:-4] for name in archive.namelist() if name.endswith(".npy")]
    except (OSError, zipfile.BadZipFile) as e:
        raise NeonError(f"cannot read {path}: {e}") from None
    key = next((k for k in NPZ_KEYS if k in members), None)
    if key is None:
        raise NeonError(f"{path} has no images under {' or '.join(NPZ_KEYS)} "
                        f"(it has: {', '.join(members) or 'nothing'})")
    array = rows.npz_array(path, key)
    where = f"{path}[{key!r}]"
    if array.dtype != np.uint8:
        raise NeonError(f"{where} holds {array.dtype} images; expected uint8 [N,H,W,3] in 0..255")
    if array.ndim != 4 or array.shape[3] != 3:
        raise NeonError(
            f"{where} has shape {list(array.shape)}; expected uint8 [N,H,W,3] (3 channels, channels last)"
        )
    if array.shape[0] == 0:
        raise NeonError(f"{where} holds no images")
    return array
