"""Reference statistics files: `.npz` with `mu` [D] and `sigma` [D, D] (the ADM and EDM reference
files load as they are)."""

import os

import numpy as np

from neon import checkpoint, distributed
from neon.errors import NeonError


def load(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as float64 from a reference `.npz`; NeonError naming what is missing."""
    if not os.path.exists(path):
        raise NeonError(f"no such reference statistics file: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in ("mu", "sigma") if key not in data.files]
            if missing:
                raise NeonError(f"{path} lacks {' and '.join(missing)} (it has: {', '.join(data.files) or 'nothing'})")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except (OSError, ValueError) as e:
        raise NeonError(f"cannot read reference statistics {path}: {e}") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise NeonError(f"{path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected [D] and [D, D]")
    return mu, sigma


def save(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write (mu, sigma) as float64 to `path` atomically."""
    with checkpoint.atomic(path) as tmp:
        np.savez(tmp, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def fetch(spec: str, cache_dir: str = "fid_stats") -> tuple[np.ndarray, np.ndarray]:
    """Collective: (mu, sigma) from a path or a URL; a URL is downloaded once into `cache_dir`, rank 0
    first (EDM's `--ref https://…/cifar10-32x32.npz`)."""
    if "://" not in spec:
        return load(spec)
    with distributed.main_first():
        path = checkpoint.download(spec, cache_dir)
    return load(path)
