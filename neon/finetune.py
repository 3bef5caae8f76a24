"""The self-training step: fine-tune a copy of θ_base on the synthetic set S.

Shaped after `NVlabs/edm2:training/training_loop.py`: intervals are counted in images, the random
state is re-derived from (seed, step, rank) at every step (`neon.rng.derive`) instead of being carried along, snapshots
(`snapshot-<images_seen:010d>.pt`: what inference and merging need) are kept apart from the
training state (`state-latest.pt`: optimizer, scaler, data position), and running the same command
again resumes from the training state. A run killed after a snapshot and resumed ends with exactly
the weights of an uninterrupted run.

This is the only place the core wraps a network in DistributedDataParallel.
"""

import contextlib
import copy
import dataclasses
import glob
import json
import logging
import os
import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from neon import config, distributed, precision, rng, synthetic
from neon import family as neon_family
from neon.errors import NeonError
from neon.io import checkpoint, files
from neon.progress import Progress

logger = logging.getLogger(__name__)

STATE = "state-latest.pt"
STATE_KEYS = ("images_seen", "identity", "net", "ema", "optimizer", "scaler")
_SNAPSHOT = re.compile(r"snapshot-(\d+)(\.pt)?$")  # a file, or a folder (Format.folder_weights)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """The recipe's `finetune` section."""

    data: str | None = None
    """Directory of the synthetic set (default: synthetic.out)."""
    out: str | None = None
    """Run directory for snapshots and the training state."""
    total_images: int = 0
    """Length of the fine-tune in images: it stops at the first step that reaches it (EDM's duration)."""
    batch_size: int = 64
    """Global batch size of one optimizer step: split evenly over the processes and their micro-steps."""
    accumulate: int = 1
    """Micro-steps per optimizer step and process (gradient accumulation): a recipe's global batch on
    fewer GPUs, with the same update. The batch is cut into world × accumulate micro-batches, and
    micro-batch s (s = rank · accumulate + micro-step) draws from the generator of (seed, step, s)
    whatever the world size, so 2 processes × 1 and 1 process × 2 give the same step."""
    lr: float = 1e-5
    """Learning rate after the ramp."""
    ramp_images: int = 0
    """Linear learning-rate ramp from 0 to lr over this many images (EDM's lr_rampup); 0: none."""
    ema_beta: float | None = None
    """Per-step EMA decay of the weights; snapshots then carry the EMA, which is θ_self_trained."""
    ema_halflife_images: int | None = None
    """EMA half-life in images (EDM's ema_halflife_kimg × 1000), instead of ema_beta."""
    ema_rampup_ratio: float | None = None
    """With ema_halflife_images: cap the half-life at this fraction of the images seen so far (EDM's
    ema_rampup_ratio, 0.05 in its train.py), so the EMA starts short and grows."""
    snapshot_every_images: int | None = None
    """Snapshot at the first step that crosses each multiple of this many images (EDM's snapshot
    ticks), and at the end; default: only at the end. Files are named by the images actually seen."""
    precision: str = "fp32"
    """fp32, bf16 (autocast) or fp16 (autocast with a gradient scaler)."""
    optimizer: str = "adam"
    """adam or adamw."""
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; None: no clipping."""
    seed: int = 0
    """Seeds the data order and every random draw of the loss."""
    workers: int = 2
    """Input pipeline: threads that read and prepare the batches of the next steps (the family's
    `prepare`) while a step runs; 0: each batch is read when its step starts. Not part of the run's
    identity: the batches and their draws are the same for any number."""

    def __post_init__(self):
        if self.total_images <= 0 or self.batch_size <= 0:
            raise NeonError("finetune.total_images and finetune.batch_size must be positive")
        if self.accumulate <= 0:
            raise NeonError(f"finetune.accumulate must be positive, got {self.accumulate}")
        if self.snapshot_every_images is not None and self.snapshot_every_images <= 0:
            raise NeonError("finetune.snapshot_every_images must be positive")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise NeonError(f"finetune.precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.optimizer not in ("adam", "adamw"):
            raise NeonError(f"finetune.optimizer must be adam or adamw, got {self.optimizer!r}")
        if self.ema_beta is not None and self.ema_halflife_images is not None:
            raise NeonError("set finetune.ema_beta or finetune.ema_halflife_images, not both")
        if self.ema_beta is not None and not 0 <= self.ema_beta < 1:
            raise NeonError(f"finetune.ema_beta must be in [0, 1), got {self.ema_beta}")
        if self.ema_rampup_ratio is not None and self.ema_halflife_images is None:
            raise NeonError("finetune.ema_rampup_ratio needs finetune.ema_halflife_images")
        if self.lr < 0 or self.ramp_images < 0:
            raise NeonError("finetune.lr and finetune.ramp_images must be >= 0")
        if self.workers < 0:
            raise NeonError(f"finetune.workers must be >= 0, got {self.workers}")

    @property
    def has_ema(self) -> bool:
        return self.ema_beta is not None or self.ema_halflife_images is not None

    def ema_decay(self, images_seen: int) -> float:
        """The EMA decay of the step that ends at `images_seen` images (EDM's training loop)."""
        if self.ema_halflife_images is None:
            return self.ema_beta
        halflife = self.ema_halflife_images
        if self.ema_rampup_ratio is not None:
            halflife = min(halflife, images_seen * self.ema_rampup_ratio)
        return 0.5 ** (self.batch_size / max(halflife, 1e-8))


def snapshot_name(images_seen: int, folder: bool = False) -> str:
    """`snapshot-<images_seen:010d>.pt`, or without the suffix for a family of folder checkpoints."""
    return f"snapshot-{images_seen:010d}" + ("" if folder else ".pt")


def images_seen(path: str) -> int | None:
    """The images a snapshot has seen, read from its name (`snapshot_name`'s inverse); None when the
    file is not named as a snapshot."""
    found = _SNAPSHOT.search(os.path.basename(path))
    return int(found.group(1)) if found else None


def snapshots(pattern: str) -> list[str]:
    """Snapshot files matching a glob pattern (a run directory means all its snapshots), in order
    of images seen."""
    if os.path.isdir(pattern):
        found = glob.glob(os.path.join(pattern, "snapshot-*"))
        return sorted(p for p in found if _SNAPSHOT.fullmatch(os.path.basename(p)))
    return sorted(glob.glob(pattern))


def run(family, model, conf: FinetuneConfig) -> Iterator[Progress]:
    """Collective: fine-tune `model.net` on the synthetic set `conf.data`, writing snapshots and the
    training state into `conf.out`; resumes from `conf.out/state-latest.pt`.

    Snapshots hold θ (the EMA when one is kept, else the trained weights) in the family's own
    container (`neon.family.write_checkpoint`), plus `family` and `images_seen`.
    Yields progress in images: a first record at the images already seen (a resumed run), then one per
    optimizer step whose `info` is {images_seen, loss (this rank's), lr, snapshot (path or None)}; the
    last record's `result` is {images_seen, loss (the last step's, None when there was nothing left to
    do), snapshots (every snapshot of the run)}. The model's weights are modified in place.
    """
    data = open_data(conf, family.name)
    world, rank = distributed.world(), distributed.rank()
    precision.apply("finetune")
    net = model.net
    device = next(net.parameters()).device
    net.train().requires_grad_(True)
    ema = copy.deepcopy(net).eval().requires_grad_(False) if conf.has_ema else None
    opt_class = torch.optim.AdamW if conf.optimizer == "adamw" else torch.optim.Adam
    opt = opt_class(net.parameters(), lr=conf.lr, betas=tuple(conf.betas), eps=conf.eps,
                    weight_decay=conf.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=conf.precision == "fp16")
    identity = _identity(conf, data)
    images_seen = _resume(conf.out, identity, net, ema, opt, scaler)
    every = conf.snapshot_every_images or conf.total_images
    ddp_net = net
    if world > 1:
        ddp_net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    train_model = dataclasses.replace(model, net=ddp_net)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(conf.precision)
    micro = conf.batch_size // (world * conf.accumulate)
    order = _DataOrder(len(data), conf.seed)
    batches = _Pipeline(family, data, order, conf, rank, micro, device)

    loss = None
    if images_seen < conf.total_images:
        yield Progress(images_seen, conf.total_images, "img")
    while images_seen < conf.total_images:
        step = images_seen // conf.batch_size
        lr = conf.lr * min(1.0, (images_seen + conf.batch_size) / conf.ramp_images) if conf.ramp_images else conf.lr
        for group in opt.param_groups:
            group["lr"] = lr
        losses = []
        for m, (samples, labels, generator) in enumerate(batches.take(images_seen)):
            shard = rank * conf.accumulate + m
            step_seed = rng.derive(conf.seed, step, shard)
            torch.manual_seed(step_seed)  # dropout / drop-path inside the network draw from the global RNG
            # DDP all-reduces the gradients on the last micro-step only
            sync = contextlib.nullcontext() if m == conf.accumulate - 1 or world == 1 else ddp_net.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                    enabled=autocast_dtype is not None):
                    micro_loss = family.loss(train_model, samples.to(device, non_blocking=True),
                                             labels.to(device, non_blocking=True), generator)
                scaler.scale(micro_loss / conf.accumulate).backward()
            losses.append(micro_loss.detach())
        loss = torch.stack(losses).mean()
        bad = (~torch.isfinite(torch.stack(losses))).any().to(torch.float32).reshape(1)
        if distributed.all_reduce_sum(bad).item() > 0:  # every rank stops, not only the one that saw it
            raise NeonError(f"the loss became non-finite ({loss.item()}) at {images_seen} images; lower "
                            f"finetune.lr or check the synthetic set (the last good snapshot is kept)")
        if conf.grad_clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), conf.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            _update_ema(ema, net, conf.ema_decay(images_seen + conf.batch_size))
        images_seen += conf.batch_size
        snapshot = None
        if images_seen // every > (images_seen - conf.batch_size) // every or images_seen >= conf.total_images:
            snapshot = _save(conf.out, family, model, net, ema, opt, scaler, images_seen, identity, loss)
        step_info = {"images_seen": images_seen, "loss": loss.item(), "lr": lr, "snapshot": snapshot}
        if images_seen < conf.total_images:
            yield Progress(images_seen, conf.total_images, "img", info=step_info)
    batches.close()
    net.eval().requires_grad_(False)
    result = {"images_seen": images_seen, "loss": None if loss is None else loss.item(),
              "snapshots": snapshots(conf.out)}
    yield Progress(images_seen, conf.total_images, "img", info=step_info if loss is not None else None,
                   result=result)


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · net for the parameters (one foreach kernel per dtype group),
    the buffers copied."""
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for e, p in zip(ema_params, net.parameters())],
                         1.0 - decay)
    torch._foreach_copy_(list(ema.buffers()), list(net.buffers()))


def open_data(conf: FinetuneConfig, family_name: str) -> synthetic.SyntheticSet:
    """Collective: the synthetic set of `conf`, checked to be complete, intact, non-empty and of
    `family_name`, and the batch size checked against the world size; NeonError otherwise."""
    if not conf.data or not conf.out:
        raise NeonError("finetune.data (--data) and finetune.out (--out) are required")
    data = synthetic.read(conf.data)
    if len(data) == 0:
        raise NeonError(f"{conf.data} is empty: a fine-tune needs samples")
    if data.manifest["family"] != family_name:
        raise NeonError(f"{conf.data} was drawn from family {data.manifest['family']!r}, not {family_name!r}")
    if conf.batch_size % (distributed.world() * conf.accumulate):
        raise NeonError(f"finetune.batch_size={conf.batch_size} is not divisible by {distributed.world()} processes "
                        f"× finetune.accumulate={conf.accumulate} micro-steps")
    _checked_state(conf.out, _identity(conf, data))
    return data


class _DataOrder:
    """The data stream: epoch e visits S in the order randperm(N) seeded by (seed, e)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._epoch, self._perm = n, seed, None, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(rng.derive(self.seed, epoch, -1))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator)
        return self._perm

    def take(self, position: int, count: int) -> torch.Tensor:
        """Indices of stream positions [position, position + count)."""
        parts = []
        while count > 0:
            epoch, offset = divmod(position, self.n)
            chunk = self._permutation(epoch)[offset:offset + count]
            parts.append(chunk)
            position, count = position + len(chunk), count - len(chunk)
        return torch.cat(parts)


class _Pipeline:
    """The input pipeline: the micro-batches of this rank for a step, each (samples, labels,
    generator), read and prepared (the family's optional `prepare`, drawing first from the step's
    generator, which then goes to `loss`) on `conf.workers` threads, up to that many steps ahead, in
    pinned memory on CUDA. The main thread takes the data order (`_DataOrder` is not shared), so
    the batches and every draw are those of a run without the pipeline."""

    def __init__(self, family, data, order: _DataOrder, conf: FinetuneConfig, rank: int, micro: int, device):
        self.data, self.order, self.conf = data, order, conf
        self.rank, self.micro, self.pin = rank, micro, device.type == "cuda"
        self.prepare = neon_family.member(family, "prepare")
        self.pool = ThreadPoolExecutor(conf.workers, "neon-input") if conf.workers else None
        self.ahead: dict[int, Future] = {}

    def take(self, position: int) -> list[tuple]:
        """The micro-batches of the step starting at stream position `position`; the next steps'
        are started."""
        if self.pool is None:
            return self._load(position, self.order.take(position, self.conf.batch_size))
        for k in range(self.conf.workers + 1):
            start = position + k * self.conf.batch_size
            if start not in self.ahead and start < self.conf.total_images:
                batch = self.order.take(start, self.conf.batch_size)
                self.ahead[start] = self.pool.submit(self._load, start, batch)
        return self.ahead.pop(position).result()

    def _load(self, position: int, batch: torch.Tensor) -> list[tuple]:
        step, conf, out = position // self.conf.batch_size, self.conf, []
        for m in range(conf.accumulate):
            shard = self.rank * conf.accumulate + m
            indices = batch[shard * self.micro:(shard + 1) * self.micro]
            generator = torch.Generator().manual_seed(rng.derive(conf.seed, step, shard))
            samples, labels = self.data.read(indices), self.data.labels[indices]
            if self.prepare is not None:
                samples = self.prepare(samples, generator)
            if self.pin:
                samples, labels = samples.pin_memory(), labels.pin_memory()
            out.append((samples, labels, generator))
        return out

    def close(self) -> None:
        if self.pool is not None:
            for future in self.ahead.values():
                future.cancel()
            self.pool.shutdown(wait=True)
            self.ahead.clear()


def _identity(conf: FinetuneConfig, data) -> dict:
    """What a resumed run must share with the run that wrote the state (the length may grow)."""
    fields = config.to_dict(conf)
    for name in ("data", "out", "total_images", "snapshot_every_images", "workers"):
        fields.pop(name)
    fields["data_shards"] = data.manifest["shards"]
    return json.loads(json.dumps(fields))


def _resume(out, identity, net, ema, opt, scaler) -> int:
    state = _checked_state(out, identity)
    if state is None:
        return 0
    path = os.path.join(out, STATE)
    try:
        net.load_state_dict(state["net"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise NeonError(f"{path} does not fit this fine-tune ({str(e).splitlines()[0]}); remove it to start "
                        f"again") from None
    logger.info("resuming %s at %d images", out, state["images_seen"])
    return state["images_seen"]


def _checked_state(out, identity) -> dict | None:
    """The training state in `out` (None when there is none), checked to be whole and to belong to a
    fine-tune with these settings."""
    path = os.path.join(out, STATE)
    if not os.path.exists(path):
        return None
    state = checkpoint.read_state(path, mmap=True)  # pages are read when touched, and shared by the ranks
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise NeonError(f"{path} is damaged (no {', '.join(missing)}); remove it to start the fine-tune again")
    if state["identity"] != identity:
        changed = sorted(k for k in identity if not isinstance(state["identity"], dict)
                         or state["identity"].get(k) != identity[k])
        raise NeonError(f"{out} holds a fine-tune with other settings ({', '.join(changed)}); "
                        f"choose another --out or remove it")
    if not isinstance(state["images_seen"], int) or state["images_seen"] < 0:
        raise NeonError(f"{path} is damaged (images_seen {state['images_seen']!r})")
    return state


def _save(out, family, model, net, ema, opt, scaler, images_seen, identity, loss) -> str:
    """Rank 0 writes the snapshot and then the training state; every rank waits for it."""
    folder = bool(getattr(family.format, "folder_weights", ()))  # a family of folder checkpoints
    path = os.path.join(out, snapshot_name(images_seen, folder))
    if distributed.is_main():
        theta = _cpu((ema if ema is not None else net).state_dict())
        neon_family.write_checkpoint(family, theta, path, like=model, family=family.name, images_seen=images_seen)
        checkpoint.write({"images_seen": images_seen, "identity": identity, "net": _cpu(net.state_dict()),
                          "ema": _cpu(ema.state_dict()) if ema is not None else {},
                          "optimizer": opt.state_dict(), "scaler": scaler.state_dict()},
                         os.path.join(out, STATE))
        files.append_jsonl(os.path.join(out, "stats.jsonl"),
                                {"images_seen": images_seen, "loss": loss.item(), "snapshot": path})
    distributed.barrier()
    return path


def _cpu(state_dict: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state_dict.items()}
