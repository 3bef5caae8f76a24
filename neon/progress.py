"""The one shape of long work: a generator of `Progress` records, drained by `drain`.

Sampling a synthetic set, fine-tuning, a sweep, Inception features and the experiments built on them
are generators that yield `Progress(done, total, unit, info, result)`: `done` counts the units
finished so far (cumulative, so a resumed run starts where it stopped), `info` is what this step has
to say (a fine-tune step's loss, a sweep's new result line), and the last record carries the
operation's `result`. Nothing is returned through StopIteration. `drain` runs one under the rank-0
progress bar (`neon.log.progress`) and hands back that result; `last` does the same without a bar.
"""

import dataclasses
from collections.abc import Callable, Iterable

from neon import log


@dataclasses.dataclass(frozen=True)
class Progress:
    """One record of long work (module docstring)."""

    done: int
    """Units finished so far, resumed ones included."""
    total: int | None
    """Units of the whole operation, or None where a search decides as it goes."""
    unit: str = "item"
    """What is counted: 'sample', 'img', 'eval', 'step', 'batch'."""
    info: dict | None = None
    """What this step reports, or None."""
    result: object = None
    """The operation's result, on its last record only."""


def drain(work: Iterable[Progress], desc: str, on_info: Callable[[dict], None] | None = None):
    """Run `work` under a rank-0 progress bar (started at the first record's `done`, sized by its
    `total`); `on_info(record.info)` for each record that carries one. Returns the last record's
    `result` (None when `work` yields nothing)."""
    record, bar = None, None
    try:
        for record in work:
            if bar is None:
                bar = log.progress(total=record.total, unit=record.unit, desc=desc, initial=record.done)
            bar.update(record.done - bar.n)
            if record.info is not None and on_info is not None:
                on_info(record.info)
    finally:
        if bar is not None:
            bar.close()
    return None if record is None else record.result


def last(work: Iterable[Progress]):
    """The result of `work` run to its end without a bar (library callers)."""
    record = None
    for record in work:
        pass
    return None if record is None else record.result
