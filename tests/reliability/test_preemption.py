"""Graceful preemption (README, "Errors, limits and the output lock"): SIGTERM during `sample`,
`finetune` and `sweep` stops them at a boundary with exit code 143 and one line saying where, the
fine-tune after writing its training state; the same command resumes and ends with exactly what an
uninterrupted run makes. The signal is sent from inside the work (`Hooked`, or `signalling.py` under
torchrun), so the step it lands in is known."""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import types

import pytest
import torch

from neon import cli, finetune, stop
from neon import family as neon_family
from neon.io import checkpoint, files
from neon.toy.family import family as toy
from tests.conftest import REPO, Crashing

pytestmark = pytest.mark.usefixtures("one_thread")

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


class Hooked:
    """The toy family, calling `action()` at the n-th call of `method` (then going on)."""

    def __init__(self, method: str, n: int, action):
        self.method, self.n, self.action, self.calls = method, n, action, 0

    def __getattr__(self, name):
        attr = getattr(toy, name)
        if name != self.method:
            return attr

        def counted(*args):
            self.calls += 1
            if self.calls == self.n:
                self.action()
            return attr(*args)

        return counted


def sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


def _exit(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(list(map(str, argv)))
    return info.value.code, capsys.readouterr().err


def _sweep_args(base, run):
    """A toy sweep of the run's snapshots over w 0, 0.5, 1 at 16 samples a point (no --out)."""
    return [
        "sweep",
        "--family",
        "toy",
        "--base",
        base,
        "--self",
        run,
        "--w",
        "0:1:0.5",
        "--num-images",
        "16",
        "--batch-size",
        "16",
    ]


def _finetune_args(base, data, out, *extra):
    return [
        "finetune",
        "--family",
        "toy",
        "--ckpt",
        base,
        "--data",
        data,
        "--out",
        out,
        "--images",
        "256",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
        "--ema-beta",
        "0.9",
        "--finetune.snapshot_every_images",
        "64",
        *extra,
    ]


def _same_state(a, b):
    one, two = (checkpoint.read_state(os.path.join(d, finetune.STATE)) for d in (a, b))
    assert one["images_seen"] == two["images_seen"]
    for key in ("net", "ema"):
        assert one[key].keys() == two[key].keys()
        assert all(torch.equal(one[key][k], two[key][k]) for k in one[key])


def test_sigterm_during_a_finetune_keeps_its_state_and_the_rerun_equals_an_uninterrupted_run(
    tmp_path, base_ckpt, synthetic_set, monkeypatch, capsys
):
    run, whole = str(tmp_path / "run"), str(tmp_path / "whole")
    with monkeypatch.context() as m:
        m.setattr(neon_family, "get", lambda spec: Hooked("loss", 5, sigterm))  # in the 5th step (80 images)
        code, err = _exit(_finetune_args(base_ckpt, synthetic_set, run), capsys)
    assert code == stop.EXIT_CODES[signal.SIGTERM] == 143 and err.count("\n") == 1
    assert err.startswith("stopped: the fine-tune stopped at 80 of 256 images")
    assert "run the same command to resume" in err
    assert checkpoint.read_state(os.path.join(run, finetune.STATE))["images_seen"] == 80  # past the snapshot
    snapshots = [os.path.basename(p) for p in finetune.snapshots(run)]
    assert snapshots == ["snapshot-0000000064.pt"]  # none that was not due
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers were given back
    cli.main(list(map(str, _finetune_args(base_ckpt, synthetic_set, run))))
    cli.main(list(map(str, _finetune_args(base_ckpt, synthetic_set, whole))))
    _same_state(run, whole)
    last = [checkpoint.read(os.path.join(d, "snapshot-0000000256.pt")).weights for d in (run, whole)]
    assert all(torch.equal(last[0][k], last[1][k]) for k in last[0])


def test_the_state_interval_bounds_what_a_hard_kill_loses(
    tmp_path, base_ckpt, synthetic_set, monkeypatch, capsys
):
    run = str(tmp_path / "run")
    with monkeypatch.context() as m:  # an hour passes between two looks at the clock; a kill in the 7th step
        m.setattr(finetune, "time", types.SimpleNamespace(monotonic=itertools.count(0, 3600).__next__))
        m.setattr(neon_family, "get", lambda spec: Crashing("loss", 7))
        code, _ = _exit(_finetune_args(base_ckpt, synthetic_set, run), capsys)  # every 30 minutes by default
    assert code == 130
    state = checkpoint.read_state(os.path.join(run, finetune.STATE))
    assert state["images_seen"] == 96  # the last step's, not the snapshot's 64
    code, err = _exit(
        _finetune_args(base_ckpt, synthetic_set, run, "--finetune.state_every_minutes", "-1"), capsys
    )
    assert code == 2 and "state_every_minutes must be >= 0" in err


def test_sigterm_during_sample_and_sweep_stops_after_the_shard_or_point(
    tmp_path, base_ckpt, synthetic_set, monkeypatch, capsys
):
    sample = [
        "sample",
        "--family",
        "toy",
        "--ckpt",
        base_ckpt,
        "--out",
        tmp_path / "S",
        "--num-images",
        "96",
        "--batch-size",
        "16",
        "--shard-size",
        "24",
        "--synthetic.labels",
        "none",
        "--sampler.zeta",
        "1.1",
    ]
    with monkeypatch.context() as m:  # in shard 1 (2 calls a shard)
        m.setattr(neon_family, "get", lambda spec: Hooked("sample", 3, sigterm))
        code, err = _exit(sample, capsys)
    assert code == 143 and err == (
        f"stopped: sampling stopped at 48 of 96 samples in {tmp_path / 'S'}; "
        f"stopped by SIGTERM: run the same command to resume\n"
    )
    shards = json.loads((tmp_path / "S" / "manifest.json").read_text())["shards"]
    assert sorted(shards) == ["shard-00000.npz", "shard-00001.npz"]
    cli.main(list(map(str, sample)))
    for name in sorted(os.listdir(synthetic_set)):
        if name.startswith("shard-"):
            with open(os.path.join(synthetic_set, name), "rb") as f:
                assert (tmp_path / "S" / name).read_bytes() == f.read()

    cli.main(list(map(str, _finetune_args(base_ckpt, synthetic_set, tmp_path / "run", "--images", "64"))))
    sweep = _sweep_args(base_ckpt, tmp_path / "run")
    with monkeypatch.context() as m:
        m.setattr(neon_family, "get", lambda spec: Hooked("sample", 2, sigterm))  # in the 2nd point
        code, err = _exit(sweep + ["--out", tmp_path / "sweep"], capsys)
    lines = err.splitlines()  # the result lines, then the stop
    assert code == 143 and lines[-1].startswith("stopped: the sweep stopped after scoring ")
    assert all(json.loads(line) for line in lines[:-1])
    assert len(files.read_jsonl(str(tmp_path / "sweep" / "results.jsonl"))) == 2  # the point in progress kept
    cli.main(list(map(str, sweep + ["--out", tmp_path / "sweep"])))
    cli.main(list(map(str, sweep + ["--out", tmp_path / "whole"])))
    fids = [
        [(r["snapshot"], r["w"], r["fid"]) for r in files.read_jsonl(str(tmp_path / d / "results.jsonl"))]
        for d in ("sweep", "whole")
    ]
    assert sorted(fids[0]) == sorted(fids[1]) and len(fids[0]) == 3


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_sigterm_under_torchrun_stops_both_ranks_at_one_step(tmp_path, base_ckpt, synthetic_set):
    """torchrun forwards the agent's SIGTERM to both workers; they agree on the step through the
    step's all-reduce. The resumed run ends where one process with 2 micro-steps ends (within float
    tolerance: DDP sums the gradient in another order, tests/dist/test_world_size.py)."""
    run = tmp_path / "run"
    argv = [
        TORCHRUN,
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "neon.cli",
        *map(str, _finetune_args(base_ckpt, synthetic_set, run, "--images", "160")),
        "--family",
        "tests.reliability.signalling:family",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stopped = subprocess.run(
        argv, capture_output=True, text=True, cwd=REPO, timeout=120, env={**env, "NEON_TEST_SIGNAL_AT": "6"}
    )  # in the 6th step, past the snapshot
    assert stopped.returncode != 0, stopped.stderr[-2000:]
    assert "stopped: the fine-tune stopped at " in stopped.stderr, stopped.stderr[-2000:]
    seen = checkpoint.read_state(str(run / finetune.STATE))["images_seen"]
    assert 64 < seen < 160
    assert [os.path.basename(p) for p in finetune.snapshots(str(run))] == ["snapshot-0000000064.pt"]
    resumed = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    cli.main(
        list(
            map(
                str,
                _finetune_args(
                    base_ckpt,
                    synthetic_set,
                    tmp_path / "one",
                    "--images",
                    "160",
                    "--finetune.accumulate",
                    "2",
                ),
            )
        )
    )
    two, one = (checkpoint.read_state(str(d / finetune.STATE)) for d in (run, tmp_path / "one"))
    for key in ("net", "ema"):
        for k in one[key]:
            torch.testing.assert_close(two[key][k], one[key][k], rtol=1e-5, atol=1e-6)


FAKE_TORCHRUN = """#!/usr/bin/env bash
# a stand-in: logs its verb, then works until a signal, which it answers as a neon worker does
echo "$PET_SIGNALS_TO_HANDLE ${@: -3:1}" >> "$LOG"
trap 'exit 143' TERM
trap 'exit 138' USR1
echo started >> "$LOG"
for _ in $(seq 100); do sleep 0.1; done
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_the_launcher_waits_for_the_stopped_step_and_starts_no_other(tmp_path, sig):
    """scripts/torchrun.sh under a signal to its process group (as SLURM signals a job step): it outlives
    the signal, waits for torchrun, and exits 143 without starting the next step."""
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    fake.write_text(FAKE_TORCHRUN)
    fake.chmod(0o755)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "LOG": str(log), "NPROC": "1"}
    job = subprocess.Popen(
        ["bash", os.path.join(REPO, "scripts", "torchrun.sh"), "recipe.yaml"],
        env=env,
        start_new_session=True,
        stderr=subprocess.PIPE,
        text=True,
    )
    while "started" not in (log.read_text() if log.exists() else ""):
        assert job.poll() is None
    os.killpg(job.pid, sig)
    assert job.wait(timeout=20) == 143
    assert "sample stopped by a signal" in job.stderr.read()
    # one step only, and torchrun told to forward SIGUSR1 too
    assert log.read_text().splitlines() == ["SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 sample", "started"]


SLURM_STAND_INS = {
    "srun": """#!/usr/bin/env bash
echo "$$" > "$LOG.srun"
trap 'echo "step got USR1" >> "$LOG"; exit 138' USR1
echo "step started" >> "$LOG"
for _ in $(seq 100); do sleep 0.1; done
""",
    "scancel": """#!/usr/bin/env bash
echo "scancel $*" >> "$LOG"
kill -USR1 "$(cat "$LOG.srun")"
""",
    "scontrol": """#!/usr/bin/env bash
if [ "$1" = show ]; then echo 127.0.0.1; else echo "scontrol $*" >> "$LOG"; fi
""",
}


def test_slurm_passes_the_warning_signal_to_the_step_and_requeues(tmp_path):
    """scripts/slurm.sbatch under stand-ins for srun, scancel and scontrol: SIGUSR1 to the batch shell
    (what `--signal=B:USR1@300` sends) reaches the job step, and the job is requeued once it ends."""
    for name, text in SLURM_STAND_INS.items():
        path = tmp_path / "bin" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    log = tmp_path / "log"
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "LOG": str(log),
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "n0",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_SUBMIT_DIR": REPO,
    }
    job = subprocess.Popen(
        ["bash", os.path.join(REPO, "scripts", "slurm.sbatch"), "recipe.yaml"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    while "step started" not in (log.read_text() if log.exists() else ""):
        assert job.poll() is None
    job.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=20) == 0
    assert log.read_text().splitlines() == [
        "step started",
        "scancel --signal=USR1 42",
        "step got USR1",
        "scontrol requeue 42",
    ]
    assert "requeueing job 42" in job.stdout.read()


def test_ranks_agree_on_the_signal_and_raise_a_rank_s_io_error(monkeypatch):
    """`stop.agree` over 2 ranks (the gather stood in for): any rank's signal stops both, SIGTERM before
    SIGUSR1; an OSError of any rank is raised on every rank."""
    from neon import distributed

    full = OSError(28, "No space left on device", "/out/shard-00001.npz")
    others = {"flags": [0.0, 0.0], "error": None}
    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(
        distributed, "gather_objects", lambda mine: [mine, (others["error"], others["flags"])]
    )
    with stop.catching():
        assert stop.agree() is None
        others["flags"] = [0.0, 1.0]  # the other rank caught SIGUSR1
        assert stop.agree() == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)  # this one SIGTERM: it wins
        assert stop.requested() == signal.SIGTERM and stop.agree() == signal.SIGTERM
        others["error"] = full
        with pytest.raises(OSError) as info:
            stop.agree()
        assert info.value is full
    assert stop.requested() is None
