"""The one exception type for user errors, and the one printer of every command's errors.

Library code raises `NeonError` for anything the user can fix (a bad flag, a missing or corrupt file,
mismatched checkpoints). `run_command`, which every entry point (the `neon` verbs, the families'
`calculate_fid.py`) runs its body under, is the only place errors are printed:

* a NeonError, or an OSError (a path that cannot be read or written; it names the path): one line
  `error: <message>`, exit code 2;
* any other exception is a bug: one line `error: internal error: <type>: <message>` with a pointer
  to `NEON_DEBUG=1`, exit code 1;
* with NEON_DEBUG=1 set, every error but Ctrl-C shows its traceback instead (for bug reports);
* Ctrl-C: `error: interrupted`, exit code 130 (every output is resumable or atomic);
* a graceful stop on SIGTERM or SIGUSR1 (`neon.stop.Stopped`): one line `stopped: <where>; ... run
  the same command to resume` on rank 0, exit code 143 or 138 (`neon.stop.EXIT_CODES`).

An OSError is a user error too: a full disk or quota, a read-only or unwritable folder, a failing
device. Writers leave nothing partial (`neon.io.files.atomic`), so the message says to free space and
run the same command again, which resumes.
"""

import argparse
import errno
import os
import sys


class NeonError(Exception):
    """A user-facing error: the message is one line that says what is wrong and, where it helps, what
    to do instead."""


class NonFiniteError(NeonError):
    """A model produced NaN or inf samples. A command that makes a synthetic set stops on it; the
    sweep records the point as unscorable (FID null) and goes on."""


def one_line(text: str) -> str:
    """`text` on one line (inner newlines become '; ')."""
    return "; ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def first_sentence(e: object) -> str:
    """The first sentence of an error message (at most 200 characters), for a one-line NeonError."""
    text = str(e)
    # torch's weights_only errors run to a dozen lines; the reason follows this marker.
    marker = "WeightsUnpickler error:"
    prefix = ""
    if marker in text:
        text, prefix = text.split(marker, 1)[1], "weights_only=True refused it: "
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0].split(". ")[0] if lines else type(e).__name__
    line = prefix + line
    return line if len(line) <= 200 else line[:197] + "..."



def fail(message: str, code: int = 2) -> None:
    """Print `error: <message>` as one line on stderr and exit with `code`."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the error contract: a usage error is one line `error: …`, exit code 2 (argparse's
    own prints the usage too)."""

    def error(self, message):
        fail(f"{message} (see `{self.prog} --help`)")


def run_command(body) -> None:
    """Run `body()` as a command: logging, the process group under torchrun, and every error printed
    as one line (module docstring)."""
    from neon import distributed, log, stop  # they import this module

    debug = os.environ.get("NEON_DEBUG") == "1"
    joined = False
    try:
        distributed.init()  # first, so that logging knows the rank: INFO on rank 0, WARNING on the others
        joined = distributed.world() > 1
        log.setup()
        body()
        distributed.barrier()  # every rank finished before any leaves
    except (NeonError, OSError) as e:
        if debug:
            raise
        fail(str(e) if isinstance(e, NeonError) else _os_message(e))
    except stop.Stopped as e:
        if distributed.is_main():
            print(f"stopped: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(e.code)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except MemoryError:
        if debug:
            raise
        fail("out of memory (an input larger than this machine can hold?)")
    except Exception as e:
        if debug:
            raise
        fail(f"internal error: {type(e).__name__}: {e} (a bug: rerun with NEON_DEBUG=1 and report the "
             f"traceback)", 1)
    finally:
        distributed.shutdown()
        if joined:  # a rank of a torchrun job ends without the finalization its gloo threads can abort
            ending = sys.exc_info()[1]
            if ending is None or isinstance(ending, SystemExit):
                distributed.exit_process(_exit_status(ending))


def _exit_status(ending: SystemExit | None) -> int:
    """The status Python would exit with after `ending` (None: a normal return)."""
    code = None if ending is None else ending.code
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr, flush=True)
    return 1


_FULL = {errno.ENOSPC, errno.EDQUOT}


def _os_message(e: OSError) -> str:
    reason = e.strerror or str(e)
    text = f"{e.filename}: {reason.lower() if reason else e}" if e.filename is not None else reason
    if e.errno in _FULL:
        text += " (nothing partial was written: free some space and run the same command again to resume)"
    return text
