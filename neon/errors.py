"""The one exception type for user errors.

Library code raises `NeonError` for anything the user can fix (a bad flag, a missing or corrupt file,
mismatched checkpoints). `run_command`, which every entry point (the `neon` verbs, the families'
`calculate_fid.py`) runs its body under, prints it as one line, `error: <message>`, and exits with
code 2. Bugs stay ordinary exceptions with tracebacks.
"""

import sys


class NeonError(Exception):
    """A user-facing error: the message is one line that says what is wrong and, where it helps, what
    to do instead."""


def run_command(body) -> None:
    """Run `body()` as a command: logging, the process group under torchrun, and a NeonError printed
    as one line `error: …` with exit code 2."""
    from neon import distributed, log  # both import this module

    try:
        log.setup()
        distributed.init()
        body()
    except NeonError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.shutdown()
