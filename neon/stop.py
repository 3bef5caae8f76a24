"""Graceful stop on a scheduler's signal: SIGTERM (preemption, a time limit) and SIGUSR1 (the warning a
job asks for with `sbatch --signal=B:USR1@SECONDS`).

`catching()` holds handlers for both signals around a command's work; a handler only records the
signal, and the long loops (`neon.synthetic.write`, `neon.finetune.run`, `neon.sweep.run`) look at it
at their boundaries: a shard, an optimizer step, an evaluation. Ranks must stop at the same boundary,
so a loop agrees on the flags through a collective it already makes (the fine-tune adds `flags()` to
its per-step all-reduce) or through `agree()` (which also raises a rank's I/O error on every rank).
The loop then leaves everything complete (the fine-tune writes its training state) and raises
`Stopped`, which `neon.errors.run_command` prints as one line and turns into the signal's exit code
(`EXIT_CODES`: 128 + the signal's number, as a shell reports a process the signal killed), so a
launcher can tell a stop that resumes from a failure, and requeue.
"""

import contextlib
import signal
import threading

from neon import distributed

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGUSR1: 138}  # 128 + 15, 128 + 10
"""The exit code of a command stopped by each signal."""

_caught: list[int] = []  # the signals caught since `catching` began, in order


class Stopped(Exception):
    """Raised where a loop stopped on a signal, after it left its outputs complete; `code` is the
    exit code (`EXIT_CODES`), the message says where it stopped."""

    def __init__(self, message: str, signum: int):
        name = signal.Signals(signum).name
        super().__init__(f"{message}; stopped by {name}: run the same command to resume")
        self.code = EXIT_CODES.get(signum, 128 + signum)


def _record(signum, frame) -> None:
    _caught.append(signum)


@contextlib.contextmanager
def catching():
    """Record SIGTERM and SIGUSR1 for the body instead of dying of them; the previous handlers come
    back after. Outside the main thread (where Python takes no handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _caught.clear()
    previous = {s: signal.signal(s, _record) for s in EXIT_CODES}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _caught.clear()


def requested() -> int | None:
    """The first signal caught by this process (not collective), or None."""
    return _caught[0] if _caught else None


def agree(error: OSError | None = None) -> int | None:
    """Collective: the signal that stops every rank (SIGTERM before SIGUSR1) when any rank caught one,
    else None; but first, when any rank passes the OSError of its writes at this boundary (a full
    disk), every rank raises the first one, so none waits on a rank that has gone. One small gather:
    call it at a boundary (a shard, an evaluation), not per batch."""
    if distributed.world() == 1:
        mine = [(error, flags())]
    else:
        mine = distributed.gather_objects((error, flags()))
    for rank_error, _ in mine:
        if rank_error is not None:
            raise rank_error
    return from_flags([sum(column) for column in zip(*(rank_flags for _, rank_flags in mine))])


def flags() -> list[float]:
    """This rank's caught signals as numbers to add to a tensor that a loop all-reduces anyway; after
    the sum, `from_flags` reads the agreed signal back."""
    return [float(s in _caught) for s in EXIT_CODES]


def from_flags(summed: list[float]) -> int | None:
    """The agreed signal from `flags()` summed over ranks (None when no rank caught one)."""
    for s, count in zip(EXIT_CODES, summed):
        if count > 0:
            return int(s)
    return None
