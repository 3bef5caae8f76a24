"""The toy family, signalled as a scheduler signals a job: at the n-th call of `loss` (the environment's
NEON_TEST_SIGNAL_AT; unset: never) rank 0 sends SIGTERM to its torchrun agent, which forwards it to
every worker, or, without torchrun, to its own process. Use it as `--family
tests.reliability.signalling:family`; it keeps the toy's name, so the toy's sets and checkpoints fit."""

import os
import signal

from neon.toy.family import family as toy


class Signalling:
    def __init__(self):
        self.calls = 0

    def __getattr__(self, name):
        return getattr(toy, name)

    def loss(self, *args):
        self.calls += 1
        at = int(os.environ.get("NEON_TEST_SIGNAL_AT", "0"))
        if self.calls == at and os.environ.get("RANK", "0") == "0":
            agent = "TORCHELASTIC_RUN_ID" in os.environ
            os.kill(os.getppid() if agent else os.getpid(), signal.SIGTERM)
        return toy.loss(*args)


family = Signalling()
