"""Logging and progress bars: one style for the whole project.

`setup(out_dir)` configures the root logger once per process: rank 0 logs INFO to stderr (and to
`out_dir/log.txt` when given), other ranks log WARNING. Library code takes
`logging.getLogger(__name__)` and never prints. `progress(...)` is the one tqdm bar: rank 0 only,
with a unit and a known total.
"""

import logging
import os
import sys

from tqdm import tqdm

from neon import distributed

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(out_dir: str | None = None) -> None:
    root = logging.getLogger()
    level = logging.INFO if distributed.is_main() else logging.WARNING
    root.setLevel(level)
    if not any(getattr(h, "_neon", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        handler._neon = True
        root.addHandler(handler)
    if out_dir is not None and distributed.is_main():
        path = os.path.abspath(os.path.join(out_dir, "log.txt"))
        if not any(getattr(h, "baseFilename", None) == path for h in root.handlers):
            os.makedirs(out_dir, exist_ok=True)
            handler = _QuietFileHandler(path)
            handler.setFormatter(logging.Formatter(_FORMAT))
            root.addHandler(handler)


class _QuietFileHandler(logging.FileHandler):
    """A log file that drops a record it cannot write (a full disk) instead of printing logging's
    traceback: the command's own writes report the disk, as one line."""

    def handleError(self, record):
        pass


def progress(iterable=None, *, total: int | None = None, unit: str, desc: str | None = None,
             initial: int = 0):
    """A tqdm bar shown on rank 0 only (and only when stderr is a terminal or NEON_PROGRESS=1)."""
    show = distributed.is_main() and (sys.stderr.isatty() or os.environ.get("NEON_PROGRESS") == "1")
    return tqdm(iterable, total=total, unit=unit, desc=desc, initial=initial, disable=not show,
                dynamic_ncols=True, leave=False)
