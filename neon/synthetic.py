"""The synthetic set S: a sharded, resumable directory of samples drawn from the base model.

Layout (DESIGN.md "Synthetic set"): `manifest.json` plus `shard-00000.npz`, ... Each shard holds
`samples` (images uint8 [n,H,W,3]; the toy float32 [n,2]), `labels` int64 [n] (−1 when
unconditional) and `seeds` int64 [n]. A shard exists only once the manifest lists it with its
sha256; files are written to a temporary name and renamed, so a killed run leaves no half shard,
and running the same command again resumes at the first missing shard.

Sample i uses seed `seed_base + i` and label `labels[i]`. Shards are dealt to ranks round-robin
and each shard is cut into the same batches whatever the world size, so with the same batch size
the set is bitwise identical for 1 or N processes (the pattern of `NVlabs/edm2:generate_images.py`).
"""

import dataclasses
import json
import logging
import os

import numpy as np
import torch

from neon import checkpoint, distributed
from neon.errors import NeonError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """The recipe's `synthetic` section."""

    out: str | None = None
    """Directory of the synthetic set."""
    num: int = 0
    """Number of samples, |S| (num_synthetic)."""
    batch_size: int = 64
    """Samples per sampler call, per process. Part of the set's identity: the same set needs the
    same batch size."""
    seed_base: int = 0
    """Sample i is drawn with seed seed_base + i."""
    shard_size: int = 1000
    """Samples per shard file: the unit of resume."""
    labels: str = "balanced"
    """'balanced' (n // C per class, remainder drawn from the seed, shuffled) or 'none' (all −1)."""

    def __post_init__(self):
        if self.num < 0 or self.batch_size <= 0 or self.shard_size <= 0:
            raise NeonError("synthetic.num must be >= 0 and batch_size, shard_size > 0")
        if self.labels not in ("balanced", "none"):
            raise NeonError(f"synthetic.labels must be 'balanced' or 'none', got {self.labels!r}")


def balanced_labels(num: int, num_classes: int, seed: int) -> torch.Tensor:
    """int64 [num]: num // C of each class, the remainder from classes drawn without replacement,
    shuffled; a function of (num, num_classes, seed) only. All −1 when num_classes == 0."""
    if num_classes == 0:
        return torch.full((num,), -1, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    extra = torch.randperm(num_classes, generator=generator)[: num % num_classes]
    labels = torch.cat([torch.arange(num_classes).repeat(num // num_classes), extra])
    return labels[torch.randperm(num, generator=generator)]


def batches(start: int, stop: int, batch_size: int) -> list[range]:
    """Sample indices [start, stop) cut into consecutive batches of batch_size (last one shorter)."""
    return [range(i, min(i + batch_size, stop)) for i in range(start, stop, batch_size)]


def draw(family, model, sampler, indices: range, labels: torch.Tensor, seed_base: int) -> torch.Tensor:
    """Samples for the given indices in one sampler call, on the CPU."""
    seeds = torch.arange(indices.start, indices.stop, dtype=torch.int64) + seed_base
    return family.sample(model, labels[indices.start:indices.stop], seeds, sampler).cpu()


def write(family, model, sampler, conf: SyntheticConfig, family_name: str, base_sha256: str):
    """Collective: draw the synthetic set described by `conf` into `conf.out`, resuming a partial one.

    Yields the number of samples finished after each round of shards (for a progress bar); the set
    is complete when the generator is exhausted. Raises NeonError when `conf.out` holds a set made
    with other settings.
    """
    if not conf.out:
        raise NeonError("synthetic.out (--out) is required")
    num_shards = -(-conf.num // conf.shard_size)
    settings = {
        "family": family_name, "base_sha256": base_sha256, "sampler": _plain(sampler),
        "num": conf.num, "labels": conf.labels, "num_classes": model.num_classes if conf.labels == "balanced" else 0,
        "seed_base": conf.seed_base, "shard_size": conf.shard_size, "batch_size": conf.batch_size,
    }
    manifest = _start(conf.out, settings)
    labels = balanced_labels(conf.num, settings["num_classes"], conf.seed_base)
    done = {name for name in manifest["shards"] if os.path.exists(os.path.join(conf.out, name))}
    pending = [j for j in range(num_shards) if _shard_name(j) not in done]
    yield conf.num - sum(_shard_len(j, conf) for j in pending)
    for round_start in range(0, len(pending), distributed.world()):
        todo = pending[round_start:round_start + distributed.world()]
        mine = distributed.shard(todo)
        written = [_write_shard(family, model, sampler, conf, labels, j) for j in mine]
        for shard_records in distributed.gather_objects(written):
            for name, digest, shape in shard_records:
                manifest["shards"][name] = digest
                manifest["sample_shape"] = shape
        if distributed.is_main():
            manifest["shards"] = dict(sorted(manifest["shards"].items()))
            checkpoint.write_json(os.path.join(conf.out, MANIFEST), manifest)
        distributed.barrier()
        yield sum(_shard_len(j, conf) for j in todo)


def _write_shard(family, model, sampler, conf, labels, j) -> tuple[str, str, list]:
    start, stop = j * conf.shard_size, min((j + 1) * conf.shard_size, conf.num)
    parts = [draw(family, model, sampler, idx, labels, conf.seed_base) for idx in batches(start, stop, conf.batch_size)]
    samples = torch.cat(parts)
    if samples.ndim == 4:  # images are stored channels-last, as PNG tools expect
        samples = samples.permute(0, 2, 3, 1)
    path = os.path.join(conf.out, _shard_name(j))
    with checkpoint.atomic(path) as tmp:
        np.savez(tmp, samples=samples.contiguous().numpy(), labels=labels[start:stop].numpy(),
                 seeds=np.arange(start, stop, dtype=np.int64) + conf.seed_base)
    return _shard_name(j), checkpoint.sha256(path), list(samples.shape[1:])


def _start(out: str, settings: dict) -> dict:
    """Collective: the manifest to continue (settings must match) or a fresh one."""
    path = os.path.join(out, MANIFEST)
    manifest = None
    if os.path.exists(path):
        manifest = _load_manifest(out)
        for key, value in settings.items():
            if manifest.get(key) != value:
                raise NeonError(f"{out} holds a synthetic set with {key}={manifest.get(key)!r}, not "
                                f"{value!r}; choose another --out or remove it")
    distributed.barrier()
    if manifest is None:
        manifest = {**settings, "sample_shape": None, "shards": {}}
        if distributed.is_main():
            os.makedirs(out, exist_ok=True)
            checkpoint.write_json(path, manifest)
    distributed.barrier()
    return manifest


@dataclasses.dataclass
class SyntheticSet:
    """A complete synthetic set in memory. samples: the family's format (images uint8 [N,3,H,W],
    the toy float32 [N,2]); labels, seeds: int64 [N]."""

    samples: torch.Tensor
    labels: torch.Tensor
    seeds: torch.Tensor
    manifest: dict


def read(directory: str, verify: bool = True) -> SyntheticSet:
    """Load a complete synthetic set; NeonError when it is missing, incomplete or corrupt."""
    manifest = _load_manifest(directory)
    num_shards = -(-manifest["num"] // manifest["shard_size"])
    if len(manifest["shards"]) < num_shards:
        raise NeonError(f"{directory} is incomplete ({len(manifest['shards'])} of {num_shards} shards); "
                        f"run the same `neon sample` command again to finish it")
    samples, labels, seeds = [], [], []
    for j in range(num_shards):
        name = _shard_name(j)
        path = os.path.join(directory, name)
        if verify and checkpoint.sha256(path) != manifest["shards"][name]:
            raise NeonError(f"{path} does not match the sha256 in its manifest")
        with np.load(path, allow_pickle=False) as shard:
            samples.append(torch.from_numpy(shard["samples"]))
            labels.append(torch.from_numpy(shard["labels"]))
            seeds.append(torch.from_numpy(shard["seeds"]))
    samples = torch.cat(samples)
    if samples.ndim == 4:
        samples = samples.permute(0, 3, 1, 2)
    return SyntheticSet(samples.contiguous(), torch.cat(labels), torch.cat(seeds), manifest)


def export_png(directory: str, out: str) -> int:
    """Write every image of the set as `out/<seed:06d>.png` (for tools that want folders).
    Returns the number of files written."""
    from PIL import Image

    data = read(directory)
    if data.samples.ndim != 4:
        raise NeonError(f"{directory} holds {data.manifest['family']} samples, not images")
    os.makedirs(out, exist_ok=True)
    for image, seed in zip(data.samples.permute(0, 2, 3, 1).numpy(), data.seeds.tolist()):
        path = os.path.join(out, f"{seed:06d}.png")
        with checkpoint.atomic(path) as tmp:
            Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(tmp, format="PNG")
    return len(data.seeds)


def _load_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise NeonError(f"{directory} is not a synthetic set (no {MANIFEST})") from None
    except json.JSONDecodeError as e:
        raise NeonError(f"{path} is corrupt: {e}") from None
    return manifest


def _shard_name(j: int) -> str:
    return f"shard-{j:05d}.npz"


def _shard_len(j: int, conf: SyntheticConfig) -> int:
    return min((j + 1) * conf.shard_size, conf.num) - j * conf.shard_size


def _plain(sampler) -> dict:
    return dataclasses.asdict(sampler) if dataclasses.is_dataclass(sampler) else dict(sampler)
