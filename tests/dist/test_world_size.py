"""gloo runs with 2 processes on the CPU: results must not depend on the world size.

torchrun's own parser takes `--num` for a prefix of its `--numa-binding` even after `-m neon.cli`,
so runs under torchrun spell it `--synthetic.num` / `--sweep.num` (README, "Multi-GPU").
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from neon import cli
from tests.conftest import REPO, save_base

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
# Both sides run one thread per process (torchrun's OMP_NUM_THREADS=1, the one_thread fixture in this
# process): bitwise equality holds for the same work split on the same threads (DESIGN.md, Determinism).
pytestmark = [pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found"), pytest.mark.numerics,
              pytest.mark.usefixtures("one_thread")]


def _torchrun(*args):
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "neon.cli", *map(str, args)],
                            capture_output=True, text=True, cwd=REPO, timeout=180,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _shards(directory):
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory)) if n.startswith("shard-")}


def _sample_args(base):
    return ["sample", "--family", "toy", "--ckpt", base, "--synthetic.num", "200", "--batch-size", "16",
            "--shard-size", "40", "--sampler.zeta", "1.1", "--synthetic.labels", "none"]


def test_two_processes_write_the_same_synthetic_set(tmp_path):
    base = save_base(tmp_path / "base.pt")
    cli.main(_sample_args(base) + ["--out", str(tmp_path / "one")])
    _torchrun(*_sample_args(base), "--out", tmp_path / "two")
    assert _shards(tmp_path / "one") == _shards(tmp_path / "two") and len(_shards(tmp_path / "one")) == 5
    manifests = [json.load(open(tmp_path / d / "manifest.json")) for d in ("one", "two")]
    assert manifests[0] == manifests[1]


def test_ddp_finetune_and_a_sweep_that_matches_one_process(tmp_path):
    base = save_base(tmp_path / "base.pt")
    cli.main(_sample_args(base) + ["--out", str(tmp_path / "S")])
    _torchrun("finetune", "--family", "toy", "--ckpt", base, "--data", tmp_path / "S", "--out", tmp_path / "run",
              "--images", "64", "--batch-size", "32", "--lr", "1e-3")
    assert (tmp_path / "run" / "snapshot-0000000064.pt").exists()
    sweep = ["sweep", "--family", "toy", "--base", base, "--self", str(tmp_path / "run"), "--w", "0,1",
             "--sweep.num", "48", "--batch-size", "16"]
    _torchrun(*sweep, "--out", tmp_path / "sweep2")
    cli.main(sweep + ["--out", str(tmp_path / "sweep1")])
    fids = [[json.loads(line)["fid"] for line in open(tmp_path / d / "results.jsonl")] for d in ("sweep1", "sweep2")]
    assert fids[0] == fids[1] and len(fids[0]) == 2


def test_accumulation_on_one_process_makes_the_step_of_two(tmp_path):
    """A recipe's global batch on fewer processes: 2 gloo processes × 1 micro-step and 1 process × 2
    micro-steps read the same micro-batches with the same draws, so their weights agree within float
    tolerance (the gradient is summed in another order); a resumed accumulating run is bitwise the
    uninterrupted one."""
    from neon.io import checkpoint

    base = save_base(tmp_path / "base.pt")
    cli.main(_sample_args(base) + ["--out", str(tmp_path / "S")])
    common = ["finetune", "--family", "toy", "--ckpt", base, "--data", tmp_path / "S", "--batch-size", "32",
              "--lr", "1e-2", "--ema-beta", "0.5"]
    _torchrun(*common, "--images", "64", "--out", tmp_path / "two")
    cli.main([*map(str, common), "--images", "64", "--out", str(tmp_path / "one"), "--finetune.accumulate", "2"])
    cli.main([*map(str, common), "--images", "32", "--out", str(tmp_path / "resumed"), "--finetune.accumulate", "2"])
    cli.main([*map(str, common), "--images", "64", "--out", str(tmp_path / "resumed"), "--finetune.accumulate", "2"])
    two, one, resumed = (checkpoint.read_state(str(tmp_path / d / "state-latest.pt")) for d in ("two", "one", "resumed"))
    base_sd = checkpoint.read(base).weights
    for key in ("net", "ema"):
        moved = max((two[key][k] - base_sd[k]).abs().max().item() for k in base_sd)
        assert moved > 1e-3  # the step did move the weights
        for k in base_sd:
            torch.testing.assert_close(one[key][k], two[key][k], rtol=1e-5, atol=1e-6)
            assert torch.equal(one[key][k], resumed[key][k]), (key, k)
