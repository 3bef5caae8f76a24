"""`neon.precision`: the TF32 and cudnn.benchmark flags each phase sets (its module docstring states why)."""

import pytest
import torch

from neon import precision


def _flags():
    """(matmul TF32, cuDNN TF32, cudnn.benchmark)."""
    backends = torch.backends
    return backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.benchmark


def _set(matmul, conv, benchmark):
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = conv, benchmark


@pytest.fixture(autouse=True)
def _restore():
    saved = _flags()
    yield
    _set(*saved)


@pytest.mark.parametrize(
    "phase, expected",
    [
        ("finetune", (False, False, False)),
        ("sample", (False, True, False)),
        ("features", (False, False, False)),
    ],
)
def test_each_phase_sets_its_flags_whatever_came_before(phase, expected):
    for before in (True, False):
        _set(before, before, before)
        precision.apply(phase)
        assert _flags() == expected


def test_tf32_overrides_both_and_unknown_phases_are_refused():
    precision.apply("finetune", tf32=True)
    assert _flags() == (True, True, False)
    with pytest.raises(ValueError, match="unknown phase"):
        precision.apply("train")
