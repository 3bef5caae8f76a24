"""Shared fixtures: deterministic torch, the toy family, a toy base checkpoint and a synthetic set."""

import os
import subprocess
import sys

# `_deterministic` turns on torch.use_deterministic_algorithms for every test, tests/gpu included, and
# then cuBLAS raises at its first matmul unless this is set before CUDA starts (CUDA's docs, "Results
# reproducibility"); scripts/gpu_check.sh sets it too. Set here, before torch is imported.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest
import torch

from neon import synthetic
from neon.family import write_checkpoint
from neon.io import checkpoint
from neon.metrics import inception
from neon.toy import appendix
from neon.toy.family import ToySampler, family
from tests.golden.fill import fill_

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: the tiny networks are faster so, and on a loaded 2-core
    machine two threads of a process can wait on each other for seconds."""
    with appendix.one_thread():
        yield


@pytest.fixture
def toy():
    return family


def save_base(path, kind="diffusion", seed=0):
    """A toy base checkpoint (random init: the mechanics do not need a trained model)."""
    model = family.tiny(seed, kind)
    write_checkpoint(family, model.net.state_dict(), str(path), like=model)
    return str(path)


@pytest.fixture
def base_ckpt(tmp_path):
    return save_base(tmp_path / "diffusion-base.pt")


@pytest.fixture
def synthetic_set(tmp_path, base_ckpt):
    """A complete 96-sample toy synthetic set in 4 shards."""
    conf = synthetic.SyntheticConfig(
        out=str(tmp_path / "synthetic"), num=96, batch_size=16, shard_size=24, labels="none"
    )
    for _ in synthetic.write(family, family.load(base_ckpt), ToySampler(zeta=1.1), conf, "sha"):
        pass
    return conf.out


class Crashing:
    """The toy family, raising KeyboardInterrupt (a stand-in for a kill) on the n-th call of `method`."""

    def __init__(self, method: str, n: int):
        self.method, self.n, self.calls = method, n, 0

    def __getattr__(self, name):
        attr = getattr(family, name)
        if name != self.method:
            return attr

        def counted(*args):
            self.calls += 1
            if self.calls == self.n:
                raise KeyboardInterrupt
            return attr(*args)

        return counted


def run_neon(*args, env=None, cwd=None):
    """`python -m neon.cli ARGS` in a subprocess; returns CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "neon.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd or REPO,
    )


def smooth(n: int, seed: int) -> torch.Tensor:
    """uint8 [n,3,32,32]: random 4×4 colour fields, upsampled (photo-like, low frequency)."""
    low = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return (torch.nn.functional.interpolate(low, size=32, mode="bilinear") * 255).round().to(torch.uint8)


def noise(n: int, seed: int) -> torch.Tensor:
    """uint8 [n,3,32,32] of uniform noise."""
    return torch.randint(
        0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def inception_weights(tmp_path_factory) -> str:
    """A random-weight InceptionV3 state dict, built once per session (tests/dist uses it too)."""
    path = tmp_path_factory.getbasetemp() / "inception-random.pth"
    if not path.exists():
        net = fill_(inception.untrained(), seed=0)
        inception.calibrate_(net, torch.cat([smooth(2, 100), noise(2, 101)]))
        checkpoint.write(net.state_dict(), str(path))
    return str(path)


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory) -> str:
    return inception_weights(tmp_path_factory)
