"""Inception statistics with 2 gloo processes on the CPU equal those of one process.

Each rank extracts the features of its batches, the features are gathered in index order, so
the statistics are the same numbers (the test allows 1e-10) for any world size.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from neon import cli
from neon.metrics import fid, stats
from tests.conftest import REPO
from tests.core.test_metrics import inception_weights, noise, smooth, write_npz

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
pytestmark = [pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found"), pytest.mark.numerics]


def test_two_processes_give_the_statistics_of_one(tmp_path, tmp_path_factory):
    weights = inception_weights(tmp_path_factory)
    source = write_npz(tmp_path / "images.npz", torch.cat([smooth(2, 5), noise(1, 6)]))
    # batches of 1: rank 0 takes images 0 and 2, rank 1 image 1
    argv = ["fid-stats", "--images", source, "--inception-weights", weights, "--batch-size", "1"]
    # The same threads per process in both runs: float32 convolutions sum in a different order with
    # another thread count (~1e-6 relative), which is not what this test is about.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli.main(argv + ["--out", str(tmp_path / "one.npz")])
    finally:
        torch.set_num_threads(threads)
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "neon.cli", *argv,
                             "--out", str(tmp_path / "two.npz")], capture_output=True, text=True, cwd=REPO,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote") == 1  # rank 0 alone reports (and writes)
    one, two = stats.load(str(tmp_path / "one.npz")), stats.load(str(tmp_path / "two.npz"))
    np.testing.assert_allclose(two[0], one[0], rtol=0, atol=1e-10)
    np.testing.assert_allclose(two[1], one[1], rtol=0, atol=1e-10)
    assert abs(fid.frechet_distance(one, two)) < 1e-6
