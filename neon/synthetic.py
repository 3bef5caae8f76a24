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
from collections.abc import Iterator

import numpy as np
import torch

from neon import distributed, log, precision, stop
from neon.errors import NeonError, NonFiniteError
from neon.io import files, rows
from neon.progress import Progress

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MAX_NUM = 100_000_000  # samples of a set or an evaluation: checked before anything of that size is allocated


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
        if self.num > MAX_NUM:
            raise NeonError(f"synthetic.num must be at most {MAX_NUM:,} (the paper's sets hold up to "
                            f"750,000)")
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
    precision.apply("sample")
    return family.sample(model, labels[indices.start:indices.stop], seeds, sampler).cpu()


def write(family, model, sampler, conf: SyntheticConfig, base_sha256: str) -> Iterator[Progress]:
    """Collective: draw the synthetic set described by `conf` into `conf.out`, resuming a partial one.

    Yields progress in samples: the samples already there, then one record per round of shards; the
    last record's `result` is `conf.out`, complete. Raises NeonError when `conf.out` holds a set made
    with other settings.
    """
    if not conf.out:
        raise NeonError("synthetic.out (--out) is required")
    num_shards = -(-conf.num // conf.shard_size)
    settings = {
        "family": family.name,
        "base_sha256": base_sha256,
        "sampler": _plain(sampler),
        "num": conf.num,
        "labels": conf.labels,
        "num_classes": model.num_classes if conf.labels == "balanced" else 0,
        "seed_base": conf.seed_base,
        "shard_size": conf.shard_size,
        "batch_size": conf.batch_size,
    }
    manifest = _start(conf.out, settings)
    labels = balanced_labels(conf.num, settings["num_classes"], conf.seed_base)
    done = {name for name in manifest["shards"] if os.path.exists(os.path.join(conf.out, name))}
    pending = [j for j in range(num_shards) if _shard_name(j) not in done]
    done = conf.num - sum(_shard_len(j, conf) for j in pending)
    if not pending:
        yield Progress(done, conf.num, "sample", result=conf.out)
        return
    yield Progress(done, conf.num, "sample")
    for round_start in range(0, len(pending), distributed.world()):
        todo = pending[round_start:round_start + distributed.world()]
        mine = distributed.shard(todo)
        try:
            written = [_write_shard(family, model, sampler, conf, labels, j) for j in mine]
        except OSError as e:  # a full disk: every rank raises it below, none waits on this one
            written = e
        everyone = distributed.gather_objects(written)
        for shard_records in everyone:
            if isinstance(shard_records, OSError):
                raise shard_records
        for shard_records in everyone:
            for name, digest, shape in shard_records:
                manifest["shards"][name] = digest
                manifest["sample_shape"] = shape
        error = None
        if distributed.is_main():
            manifest["shards"] = dict(sorted(manifest["shards"].items()))
            try:
                files.write_json(os.path.join(conf.out, MANIFEST), manifest)
                # the writer hashed these shards itself: readers need not hash them again
                _stamp(conf.out, {name: manifest["shards"][name] for name in map(_shard_name, todo)})
            except OSError as e:  # a full disk: raised on every rank by stop.agree
                error = e
        signum = stop.agree(error)  # the barrier too: a signal caught by any rank stops all after this round
        done += sum(_shard_len(j, conf) for j in todo)
        if signum is not None and done < conf.num:
            raise stop.Stopped(f"sampling stopped at {done} of {conf.num} samples in {conf.out}", signum)
        yield Progress(done, conf.num, "sample", result=conf.out if done == conf.num else None)


def _write_shard(family, model, sampler, conf, labels, j) -> tuple[str, str, list]:
    start, stop = j * conf.shard_size, min((j + 1) * conf.shard_size, conf.num)
    parts = [
        draw(family, model, sampler, idx, labels, conf.seed_base)
        for idx in batches(start, stop, conf.batch_size)
    ]
    samples = torch.cat(parts)
    if samples.is_floating_point() and not torch.isfinite(samples).all():
        bad = (~torch.isfinite(samples.flatten(1))).any(1).nonzero().flatten()
        raise NonFiniteError(f"the sampler produced non-finite samples (NaN or inf), first at seed "
                        f"{conf.seed_base + start + int(bad[0])}: a diverged model or sampler setting")
    if samples.ndim == 4:  # images are stored channels-last, as PNG tools expect
        samples = samples.permute(0, 2, 3, 1)
    path = os.path.join(conf.out, _shard_name(j))
    with files.atomic(path) as tmp:
        np.savez(tmp, samples=samples.contiguous().numpy(), labels=labels[start:stop].numpy(),
                 seeds=np.arange(start, stop, dtype=np.int64) + conf.seed_base)
    return _shard_name(j), files.sha256(path), list(samples.shape[1:])


def _start(out: str, settings: dict) -> dict:
    """Collective: the manifest to continue (settings must match) or a fresh one."""
    path = os.path.join(out, MANIFEST)
    manifest = None
    if os.path.exists(path):
        manifest = load_manifest(out)
        if not manifest["shards"]:  # nothing drawn yet (a run that failed early): start afresh
            manifest = None
    if manifest is not None:
        for key, value in settings.items():
            if manifest.get(key) != value:
                raise NeonError(f"{out} holds a synthetic set with {key}={manifest.get(key)!r}, not "
                                f"{value!r}; choose another --out or remove it")
    distributed.barrier()
    if manifest is None:
        manifest = {**settings, "sample_shape": None, "shards": {}}
        if distributed.is_main():
            os.makedirs(out, exist_ok=True)
            files.write_json(path, manifest)
    distributed.barrier()
    return manifest


STAMP = "verified.json"  # shards whose sha256 was checked, with the size and mtime they had then


class SyntheticSet:
    """A complete synthetic set, read lazily (DESIGN.md "Synthetic set").

    Each shard's `samples` array is read in place from its `.npz` (np.savez stores members
    uncompressed; `RowFile`), so `read` reads only the rows it is asked for: a 750k-image set at 256² (147 GB)
    never sits in memory. `labels` and `seeds` (int64 [N], 16 bytes a sample) are read at open.
    """

    def __init__(self, directory: str, manifest: dict, arrays: list[np.ndarray], labels: torch.Tensor,
                 seeds: torch.Tensor):
        self.directory, self.manifest, self.labels, self.seeds = directory, manifest, labels, seeds
        self._arrays = arrays
        self.shard_size = manifest["shard_size"]

    def __len__(self) -> int:
        return len(self.seeds)

    @property
    def holds_images(self) -> bool:
        return len(self.manifest.get("sample_shape") or []) == 3

    def read(self, indices) -> torch.Tensor:
        """The samples at `indices` (a range, a list or an int64 tensor, any order, repeats allowed) in
        the family's format: images uint8 [n,3,H,W], the toy's points float32 [n,2]; on the CPU."""
        index = torch.as_tensor(list(indices) if isinstance(indices, range) else indices, dtype=torch.int64)
        if index.numel() and (index.min() < 0 or index.max() >= len(self)):
            raise NeonError(f"{self.directory}: sample index out of range [0, {len(self)})")
        shard, row = index // self.shard_size, index % self.shard_size
        out = np.empty((len(index), *self._arrays[0].shape[1:]), dtype=self._arrays[0].dtype)
        for j in torch.unique(shard).tolist():  # one read per shard touched
            where = (shard == j).nonzero().flatten().numpy()
            out[where] = self._arrays[j][row[where].numpy()]
        samples = torch.from_numpy(out)
        return samples.permute(0, 3, 1, 2).contiguous() if samples.ndim == 4 else samples


def read(directory: str, verify: bool = True) -> SyntheticSet:
    """Collective: open a complete synthetic set for streamed reading; NeonError when it is missing,
    incomplete or corrupt. With `verify`, each shard's sha256 is checked against the manifest once:
    the ranks hash a share of the shards each and rank 0 records them in `verified.json` with their
    size and mtime; later reads trust shards whose size and mtime are unchanged."""
    manifest = load_manifest(directory)
    names = _shard_names(directory, manifest)
    if verify:
        _verify(directory, manifest, names)
    if not names:
        return SyntheticSet(
            directory,
            manifest,
            [np.empty((0, 2), np.float32)],
            torch.empty(0, dtype=torch.int64),
            torch.empty(0, dtype=torch.int64),
        )
    arrays, labels, seeds = [], [], []
    for name in names:
        path = os.path.join(directory, name)
        arrays.append(rows.npz_array(path, "samples"))
        with np.load(path, allow_pickle=False) as shard:  # reads only the two small members
            labels.append(torch.from_numpy(shard["labels"]))
            seeds.append(torch.from_numpy(shard["seeds"]))
    return SyntheticSet(directory, manifest, arrays, torch.cat(labels), torch.cat(seeds))


def export_png(directory: str, out: str) -> int:
    """Write every image of the set as `out/<seed:06d>.png` (for tools that want folders), one shard
    in memory at a time. Returns the number of files written."""
    from PIL import Image

    data = read(directory)
    if not data.holds_images:
        raise NeonError(f"{directory} holds {data.manifest['family']} samples, not images")
    os.makedirs(out, exist_ok=True)
    for part in batches(0, len(data), data.shard_size):
        images = data.read(part).permute(0, 2, 3, 1).numpy()
        for image, seed in zip(images, data.seeds[part.start:part.stop].tolist()):
            path = os.path.join(out, f"{seed:06d}.png")
            with files.atomic(path) as tmp:
                Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(tmp, format="PNG")
    return len(data)


def _shard_names(directory: str, manifest: dict) -> list[str]:
    """The shard files of a complete set, in order; NeonError when it is incomplete."""
    num_shards = -(-manifest["num"] // manifest["shard_size"])
    names = [_shard_name(j) for j in range(num_shards)]
    missing = [name for name in names if name not in manifest["shards"]]
    if missing:
        raise NeonError(f"{directory} is incomplete ({num_shards - len(missing)} of {num_shards} shards); "
                        f"run the same `neon sample` command again to finish it")
    return names


def _verify(directory: str, manifest: dict, names: list[str]) -> None:
    """Collective: check every shard's sha256 against the manifest, once (see `read`)."""
    stamp = _read_stamp(directory)
    todo = [
        name for name in names if stamp.get(name) != _fingerprint(directory, name, manifest["shards"][name])
    ]
    checked = []
    for name in log.progress(distributed.shard(todo), unit="shard", desc="sha256"):
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            checked.append((name, f"{path} is missing"))
        elif files.sha256(path) != manifest["shards"][name]:
            checked.append((name, f"{path} does not match the sha256 in its manifest"))
        else:
            checked.append((name, None))
    results = [item for part in distributed.gather_objects(checked) for item in part]
    problems = [problem for _, problem in results if problem]
    if problems:
        raise NeonError(
            problems[0] + (f" (and {len(problems) - 1} more shards)" if len(problems) > 1 else "")
        )
    if todo and distributed.is_main():
        _stamp(directory, {name: manifest["shards"][name] for name, _ in results})
    distributed.barrier()


def _read_stamp(directory: str) -> dict:
    try:
        with open(os.path.join(directory, STAMP)) as f:
            stamp = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}  # no stamp, or a damaged one: it only costs a rehash
    return stamp if isinstance(stamp, dict) else {}


def _stamp(directory: str, digests: dict[str, str]) -> None:
    """Record shards as checked (their sha256 matched `digests`) with their current size and mtime."""
    stamp = _read_stamp(directory)
    stamp.update({name: _fingerprint(directory, name, digest) for name, digest in digests.items()})
    files.write_json(os.path.join(directory, STAMP), dict(sorted(stamp.items())))


def _fingerprint(directory: str, name: str, digest: str) -> list | None:
    """[sha256, size, mtime_ns] of a shard as it is now (None when it is missing)."""
    try:
        info = os.stat(os.path.join(directory, name))
    except FileNotFoundError:
        return None
    return [digest, info.st_size, info.st_mtime_ns]


def load_manifest(directory: str) -> dict:
    """The manifest of the set in `directory`, checked field by field; NeonError (one line) when it is
    missing, unreadable or malformed."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise NeonError(f"{directory} is not a synthetic set (no {MANIFEST})") from None
    except json.JSONDecodeError as e:
        raise NeonError(f"{path} is corrupt: {e}") from None
    except IsADirectoryError:
        raise NeonError(f"{path} is a directory, not a manifest") from None
    _check_manifest(path, manifest)
    return manifest


def _check_manifest(path: str, manifest) -> None:
    """The fields readers rely on, with their types and ranges; NeonError naming the first bad one."""
    if not isinstance(manifest, dict):
        raise NeonError(f"{path} is corrupt: the manifest is a {type(manifest).__name__}, not a mapping")
    def bad(field, expected):
        raise NeonError(f"{path} is corrupt: {field} should be {expected}, got {manifest.get(field)!r}")
    for field in ("num", "seed_base", "batch_size"):
        if not isinstance(manifest.get(field), int) or isinstance(manifest.get(field), bool):
            bad(field, "an integer")
    if manifest["num"] < 0:
        bad("num", ">= 0")
    if not isinstance(manifest.get("shard_size"), int) or manifest["shard_size"] <= 0:
        bad("shard_size", "a positive integer")
    shards = manifest.get("shards")
    if not isinstance(shards, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in shards.items()
    ):
        bad("shards", "a mapping of shard names to sha256 digests")
    expected = {_shard_name(j) for j in range(-(-manifest["num"] // manifest["shard_size"]))}
    strays = sorted(set(shards) - expected)
    if strays:  # names are ours (shard-00000.npz, …): a path in the manifest is never followed
        raise NeonError(f"{path} is corrupt: it lists {strays[0]!r}, not a shard of this set")
    if not isinstance(manifest.get("family"), str):
        bad("family", "a family name")
    shape = manifest.get("sample_shape")
    if shape is not None and not (
        isinstance(shape, list) and all(isinstance(d, int) and d > 0 for d in shape)
    ):
        bad("sample_shape", "a list of positive integers")


def _shard_name(j: int) -> str:
    return f"shard-{j:05d}.npz"


def _shard_len(j: int, conf: SyntheticConfig) -> int:
    return min((j + 1) * conf.shard_size, conf.num) - j * conf.shard_size


def _plain(sampler) -> dict:
    return dataclasses.asdict(sampler) if dataclasses.is_dataclass(sampler) else dict(sampler)
