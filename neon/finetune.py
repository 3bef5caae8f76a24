"""The self-training step: fine-tune a copy of θ_base on the synthetic set S.

Shaped after `NVlabs/edm2:training/training_loop.py`: intervals are counted in images, the random state
is re-derived from (seed, step, shard) at every step (`neon.rng.derive`) instead of being carried along,
snapshots (`snapshot-<images_seen:010d>.pt`: what inference and merging need) are kept apart from the
training state (`state-latest.pt`: optimizer, scaler, data position), and running the same command
again resumes from the training state. A run killed after a snapshot and resumed ends with exactly
the weights of an uninterrupted run.

Faults: on SIGTERM or SIGUSR1 (`neon.stop`) every rank finishes the optimizer step in progress, the
training state is written (a snapshot too only where one is due) and `neon.stop.Stopped` is raised;
the training state is also written every `state_every_minutes` of wall time, so a hard kill (SIGKILL,
a dead node) loses at most that much work. The ranks agree on both at the step's one all-reduce,
which already carries the non-finite-loss flag: no extra collective or host sync per step.

This is the only place the core wraps a network in DistributedDataParallel.
"""

import contextlib
import copy
import dataclasses
import glob
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator

import torch

from neon import batches, config, distributed, precision, rng, stop, synthetic
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
    state_every_minutes: float = 30
    """Also write the training state every this many minutes of wall time (rank 0's clock), so a hard
    kill loses at most that much; 0: only with snapshots and on a graceful stop. Writing it costs
    about two copies of the weights plus the optimizer's moments of disk traffic."""
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
        if not (math.isfinite(self.state_every_minutes) and self.state_every_minutes >= 0):
            raise NeonError(f"finetune.state_every_minutes must be >= 0 (0: off), got "
                            f"{self.state_every_minutes}")
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


def snapshot_count(conf: FinetuneConfig) -> int:
    """The snapshots a fine-tune of `conf` writes: one at each step that crosses a multiple of
    `snapshot_every_images`, and one at the end (`run`)."""
    every = conf.snapshot_every_images or conf.total_images
    steps = -(-conf.total_images // conf.batch_size)
    crossings = {(k * conf.batch_size) // every for k in range(1, steps)} - {0}
    return len(crossings) + 1


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

    Faults (module docstring): a SIGTERM/SIGUSR1 caught by any rank inside `neon.stop.catching` raises
    `neon.stop.Stopped` on every rank after the same step, its training state written; an I/O error of
    rank 0's writes is raised on every rank.
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
    order = batches.DataOrder(len(data), conf.seed)
    state_every, state_written = conf.state_every_minutes * 60, time.monotonic()
    stream = batches.Pipeline(family, data, order, conf, rank, micro, device)

    try:
        loss = None
        if images_seen < conf.total_images:
            yield Progress(images_seen, conf.total_images, "img")
        while images_seen < conf.total_images:
            step = images_seen // conf.batch_size
            lr = (
                conf.lr * min(1.0, (images_seen + conf.batch_size) / conf.ramp_images)
                if conf.ramp_images
                else conf.lr
            )
            for group in opt.param_groups:
                group["lr"] = lr
            losses = []
            for m, (samples, labels, generator) in enumerate(stream.take(images_seen)):
                shard = rank * conf.accumulate + m
                step_seed = rng.derive(conf.seed, step, shard)
                # dropout / drop-path inside the network draw from the global RNG
                torch.manual_seed(step_seed)
                # DDP all-reduces the gradients on the last micro-step only
                sync = (
                    contextlib.nullcontext() if m == conf.accumulate - 1 or world == 1 else ddp_net.no_sync()
                )
                with sync:
                    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                        enabled=autocast_dtype is not None):
                        micro_loss = family.loss(train_model, samples.to(device, non_blocking=True),
                                                 labels.to(device, non_blocking=True), generator)
                    scaler.scale(micro_loss / conf.accumulate).backward()
                losses.append(micro_loss.detach())
            loss = torch.stack(losses).mean()
            bad = (~torch.isfinite(torch.stack(losses))).any().to(torch.float32).reshape(1)
            # The step's one all-reduce (and host sync): a non-finite loss on any rank, whether rank 0's clock
            # says the training state is due, and the signals caught; every rank acts on the same sums.
            due = (
                distributed.is_main() and state_every > 0 and time.monotonic() - state_written >= state_every
            )
            host = [float(due), *stop.flags()]
            flags = torch.cat([bad, bad.new_zeros(len(host))])
            for i, value in enumerate(host):
                if value:  # a scalar fill: the usual step copies nothing from the host to the device
                    flags[1 + i].fill_(value)
            summed = distributed.all_reduce_sum(flags).tolist()
            signum, state_due = stop.from_flags(summed[2:]), summed[1] > 0
            if summed[0] > 0:  # every rank stops, not only the one that saw it
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
            if (
                images_seen // every > (images_seen - conf.batch_size) // every
                or images_seen >= conf.total_images
            ):
                snapshot = _save(conf.out, family, model, net, ema, opt, scaler, images_seen, identity, loss)
            elif state_due or signum is not None:  # the training state alone: no snapshot that is not due
                _save(conf.out, family, model, net, ema, opt, scaler, images_seen, identity, loss,
                      snapshot=False)
            if snapshot is not None or state_due or signum is not None:
                state_written = time.monotonic()
            if signum is not None and images_seen < conf.total_images:
                raise stop.Stopped(
                    f"the fine-tune stopped at {images_seen} of {conf.total_images} images, its "
                    f"training state in {os.path.join(conf.out, STATE)}",
                    signum,
                )
            step_info = {"images_seen": images_seen, "loss": loss.item(), "lr": lr, "snapshot": snapshot}
            if images_seen < conf.total_images:
                yield Progress(images_seen, conf.total_images, "img", info=step_info)
    finally:
        stream.close()  # also when the loop ends early: a stop, an error, a consumer that left
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
        raise NeonError(
            f"finetune.batch_size={conf.batch_size} is not divisible by {distributed.world()} processes "
            f"× finetune.accumulate={conf.accumulate} micro-steps"
        )
    _checked_state(conf.out, _identity(conf, data))
    return data


def _identity(conf: FinetuneConfig, data) -> dict:
    """What a resumed run must share with the run that wrote the state (the length may grow)."""
    fields = config.to_dict(conf)
    for name in ("data", "out", "total_images", "snapshot_every_images", "state_every_minutes", "workers"):
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
        raise NeonError(
            f"{path} is damaged (no {', '.join(missing)}); remove it to start the fine-tune again"
        )
    if state["identity"] != identity:
        changed = sorted(k for k in identity if not isinstance(state["identity"], dict)
                         or state["identity"].get(k) != identity[k])
        raise NeonError(f"{out} holds a fine-tune with other settings ({', '.join(changed)}); "
                        f"choose another --out or remove it")
    if not isinstance(state["images_seen"], int) or state["images_seen"] < 0:
        raise NeonError(f"{path} is damaged (images_seen {state['images_seen']!r})")
    return state


def _save(out, family, model, net, ema, opt, scaler, images_seen, identity, loss,
          snapshot: bool = True) -> str | None:
    """Collective: rank 0 writes the snapshot (with `snapshot`) and then the training state; every rank
    waits for it, and every rank raises rank 0's I/O error (a full disk) if it had one. Returns the
    snapshot's path (None without one)."""
    folder = bool(getattr(family.format, "folder_weights", ()))  # a family of folder checkpoints
    path = os.path.join(out, snapshot_name(images_seen, folder)) if snapshot else None
    error = None
    if distributed.is_main():
        try:
            if snapshot:
                theta = _cpu((ema if ema is not None else net).state_dict())
                neon_family.write_checkpoint(family, theta, path, like=model, family=family.name,
                                             images_seen=images_seen)
            checkpoint.write({"images_seen": images_seen, "identity": identity, "net": _cpu(net.state_dict()),
                              "ema": _cpu(ema.state_dict()) if ema is not None else {},
                              "optimizer": opt.state_dict(), "scaler": scaler.state_dict()},
                             os.path.join(out, STATE))
            if snapshot:
                files.append_jsonl(os.path.join(out, "stats.jsonl"),
                                   {"images_seen": images_seen, "loss": loss.item(), "snapshot": path})
        except OSError as e:
            error = e
    error = distributed.broadcast_object(error)  # the barrier too
    if error is not None:
        raise error
    return path


def _cpu(state_dict: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state_dict.items()}
