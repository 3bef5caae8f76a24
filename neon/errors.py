"""The one exception type for user errors.

Library code raises `NeonError` for anything the user can fix (a bad flag, a missing or corrupt file,
mismatched checkpoints). `neon.cli.main` prints it as one line, `error: <message>`, and exits with
code 2. Bugs stay ordinary exceptions with tracebacks.
"""


class NeonError(Exception):
    """A user-facing error: the message is one line that says what is wrong and, where it helps, what
    to do instead."""
