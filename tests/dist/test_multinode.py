"""Two "nodes" of one gloo process each on localhost, joined by a c10d rendezvous, through the real
launchers: scripts/slurm.sbatch (under stand-ins for `srun` and `scontrol`) starts scripts/torchrun.sh
once per node, concurrently, and each runs `torchrun --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d`
for sample and sweep. The synthetic set and the sweep's FIDs must be those of one process. (The
fine-tune runs here, in-process, to keep the test short: every torchrun costs two imports of torch
per node. DDP over 2 processes is tested in test_world_size.py.)

Both sides run one thread per process (OMP_NUM_THREADS=1, the one_thread fixture here): bitwise
equality holds for the same work split on the same threads (DESIGN.md, Determinism).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from neon import cli
from tests.conftest import REPO, save_base
from tests.dist.test_world_size import _shards

BIN = os.path.dirname(sys.executable)
pytestmark = [pytest.mark.skipif(shutil.which("torchrun", path=BIN) is None, reason="torchrun not found"),
              pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]

# Stand-ins for SLURM's tools, enough for scripts/slurm.sbatch: every node is this machine, and srun
# starts its command once per node, concurrently (node N logs to $LOGS/nodeN.log), and fails if any copy fails.
SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] || exit 2
for _ in $(seq "$SLURM_JOB_NUM_NODES"); do echo 127.0.0.1; done
"""
SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for node in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do
  SLURM_NODEID=$node "$@" > "$LOGS/node$node.log" 2>&1 & pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_slurm(bin_dir):
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)


def _recipe(path, base, out):
    path.write_text(f"""family: toy
model:
  ckpt: {base}
sampler:
  zeta: 1.1
synthetic:
  out: {out}/S
  num: 200
  batch_size: 16
  shard_size: 40
  labels: none
finetune:
  out: {out}/run
  total_images: 64
  batch_size: 32
  lr: 1e-3
sweep:
  w: "0,1"
  num: 48
  batch_size: 16
""")
    return str(path)


def test_two_nodes_write_the_same_synthetic_set_and_sweep_as_one_process(tmp_path):
    base = save_base(tmp_path / "base.pt")
    recipe = _recipe(tmp_path / "recipe.yaml", base, tmp_path / "two")
    # One process, here: the synthetic set, and the fine-tune (into the recipe's run) that both sweeps score.
    cli.main(["sample", "--config", recipe, "--out", str(tmp_path / "one")])
    cli.main(["finetune", "--config", recipe, "--data", str(tmp_path / "one")])
    _fake_slurm(tmp_path / "bin")
    launcher = ("NPROC", "NNODES", "NODE_RANK", "RDZV_ENDPOINT", "RDZV_ID", "RDZV_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in launcher}
    env = {**env, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "SLURM_SUBMIT_DIR": REPO, "SLURM_JOB_ID": "test", "SLURM_JOB_NODELIST": "n[0-1]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "1", "RDZV_PORT": str(_free_port()),
           "LOGS": str(tmp_path), "STEPS": "sample sweep",
           "LOGLEVEL": "INFO"}  # torchrun's agents then log their rendezvous
    job = subprocess.Popen(["bash", os.path.join(REPO, "scripts", "slurm.sbatch"), recipe], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = job.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # the torchruns too, so none waits on in the rendezvous
        output, _ = job.communicate()
    agent_logs = [log.read_text() if log.exists() else "" for log in (tmp_path / "node0.log", tmp_path / "node1.log")]
    assert job.returncode == 0, output + "".join(log[-3000:] for log in agent_logs)
    assert "2 nodes x 1 processes, rendezvous 127.0.0.1:" in output
    # Each of the two steps was one rendezvous of both nodes (torchrun's agents log it at INFO).
    ranks = [re.findall(r"group_rank=(\d+)", log) for log in agent_logs]
    assert all(log.count("group_world_size=2") == 2 for log in agent_logs)
    assert len(ranks[0]) == len(ranks[1]) == 2 and all({a, b} == {"0", "1"} for a, b in zip(*ranks))

    # The same synthetic set, bitwise, and the same FIDs of the same snapshot as one process.
    shards = _shards(tmp_path / "one")
    assert shards == _shards(tmp_path / "two" / "S") and len(shards) == 5
    manifests = [json.load(open(tmp_path / d / "manifest.json")) for d in ("one", "two/S")]
    assert manifests[0] == manifests[1]
    cli.main(["sweep", "--config", recipe, "--out", str(tmp_path / "sweep1")])
    points = [[json.loads(line) for line in open(d / "results.jsonl")]
              for d in (tmp_path / "sweep1", tmp_path / "two" / "run" / "sweep")]
    assert [p["snapshot"] for p in points[1]] == ["base", str(tmp_path / "two" / "run" / "snapshot-0000000064.pt")]
    assert [p["fid"] for p in points[0]] == [p["fid"] for p in points[1]]
