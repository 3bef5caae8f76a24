"""Reference statistics files: `.npz` with `mu` [D] and `sigma` [D, D] (the ADM and EDM reference
files load as they are)."""

import os

import numpy as np

from neon import distributed
from neon.errors import NeonError
from neon.io import files, rows

MAX_DIM = 16384
"""The largest feature dimension of reference statistics (sigma: 2 GiB in float64; Inception's is 2048)."""


def load(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as float64 from a reference `.npz`, checked before anything is read whole (shapes
    [D] and [D, D] with D <= MAX_DIM, real numbers) and after (finite); NeonError otherwise."""
    if not os.path.exists(path):
        raise NeonError(f"no such reference statistics file: {path}")
    if os.path.isdir(path):
        raise NeonError(f"{path} is a directory, not reference statistics (.npz)")
    try:
        with np.load(path, allow_pickle=False) as data:
            files = data.files
    except (OSError, ValueError) as e:
        raise NeonError(f"cannot read reference statistics {path}: {e}") from None
    missing = [key for key in ("mu", "sigma") if key not in files]
    if missing:
        raise NeonError(f"{path} lacks {' and '.join(missing)} (it has: {', '.join(files) or 'nothing'})")
    (mu_shape, mu_dtype), (sigma_shape, sigma_dtype) = (rows.npz_header(path, key) for key in ("mu", "sigma"))
    if len(mu_shape) != 1 or tuple(sigma_shape) != (mu_shape[0], mu_shape[0]):
        raise NeonError(
            f"{path}: mu has shape {list(mu_shape)} and sigma {list(sigma_shape)}; expected [D] and [D, D]"
        )
    if mu_shape[0] > MAX_DIM:
        raise NeonError(f"{path}: features of dimension {mu_shape[0]}, above the limit of {MAX_DIM}")
    if not all(
        np.issubdtype(d, np.floating) or np.issubdtype(d, np.integer) for d in (mu_dtype, sigma_dtype)
    ):
        raise NeonError(f"{path}: mu and sigma must hold real numbers, not {mu_dtype} and {sigma_dtype}")
    mu, sigma = (np.asarray(rows.npz_array(path, key)[:], dtype=np.float64) for key in ("mu", "sigma"))
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise NeonError(f"{path}: mu or sigma holds non-finite values (NaN or inf)")
    return mu, sigma


def save(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write (mu, sigma) as float64 to `path` atomically."""
    with files.atomic(path) as tmp:
        np.savez(tmp, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def fetch(spec: str, cache_dir: str = "fid_stats") -> tuple[np.ndarray, np.ndarray]:
    """Collective: (mu, sigma) from a path or a URL; a URL is downloaded once into `cache_dir`, rank 0
    first (EDM's `--ref https://…/cifar10-32x32.npz`)."""
    if "://" not in spec:
        return load(spec)
    with distributed.main_first():
        path = files.download(spec, cache_dir)
    return load(path)
