"""Process-group setup and the few collectives the core needs.

Shaped after `NVlabs/edm2:torch_utils/distributed.py`, with torchtune's backend choice: nccl when
CUDA is available, gloo otherwise (the CPU path the tests exercise). Everything works without
`torchrun`: then `rank()` is 0, `world()` is 1 and the collectives are identities.

Only `neon.cli` and the family `calculate_fid.py` shims call `init()`. Family modules never import
this file or `torch.distributed`.
"""

import contextlib
import datetime
import logging
import os
import sys

import torch
import torch.distributed as dist


def init() -> None:
    """Join the process group that torchrun describes; a no-op when `WORLD_SIZE` is unset or 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def shutdown() -> None:
    """Leave the process group (if any), so torchrun sees a clean exit."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int):
    """End this process now with exit status `code`, without the interpreter's finalization: for a rank
    that has left its process group. After `shutdown()` a gloo worker thread can still hold the last
    reference to a finished collective's tensors; dropping it takes the GIL, and a thread that asks for
    the GIL while the interpreter finalizes aborts the process (SIGABRT, "terminate called without an
    active exception") although every rank finished its work. stdout, stderr and the log handlers are
    flushed first; atexit hooks do not run (the core registers none)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def deterministic() -> None:
    """Ask for bitwise reruns on GPU (`--deterministic`): deterministic algorithms only, cuDNN's
    autotuner off, and the cuBLAS workspace setting that deterministic GEMMs need. Call it before the
    first CUDA kernel. It costs speed (cuDNN keeps slower fixed algorithms; some ops lose their fast
    atomics) and raises on the few ops that have no deterministic form. Without it, the same command
    on the same device and thread count is already bitwise reproducible on CPU (README, "Determinism")."""
    # The one environment variable a module sets: cuBLAS reads it when its handle is created, which a
    # launcher cannot do later for a flag the recipe turns on. An explicit user setting wins.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def device() -> torch.device:
    """This rank's device: its local GPU under CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    """Collective: wait for every rank."""
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Run the body on rank 0 first, then on the others: for downloads and caches that every rank
    reads but only one should write."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def shard(items):
    """This rank's share of `items` (a sequence or an int n, meaning range(n)), dealt round-robin:
    rank r gets items r, r + world, r + 2 world, ... Work is split by index, never by per-rank
    seeds, so results do not depend on the world size."""
    if isinstance(items, int):
        items = range(items)
    return items[rank()::world()]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Collective: sum `tensor` over ranks in place (on the process group's device) and return it."""
    if dist.is_initialized():
        work = tensor.to(_comm_device())
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        tensor.copy_(work)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Collective: every rank returns rank `src`'s `obj` (any picklable value)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Collective: every rank returns the list of all ranks' `obj`, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    return device() if dist.get_backend() == "nccl" else torch.device("cpu")
