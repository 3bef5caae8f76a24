"""Faults and traps beside the bad-input table: the command line (negative numbers, launcher-proof
flag names), the error printer, torn JSON lines, stale temporaries, the output lock, non-finite
values and a failed first run that must not block the corrected one."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from neon import cli, verbs
from neon.family import read_checkpoint
from neon.io import checkpoint, files
from neon.toy.family import family as toy
from tests.conftest import REPO, run_neon, save_base
from tests.reliability.test_bad_inputs import nan_ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


def _exit(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code, capsys.readouterr()


def test_negative_grids_and_numbers_parse(capsys):
    cli.main(
        [
            "sweep",
            "--family",
            "toy",
            "--base",
            "b.pt",
            "--self",
            "r",
            "--w",
            "-2:2:0.25",
            "--cfg",
            "-1",
            "2",
            "--dry-run",
        ]
    )
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["sweep"]["w"] == "-2:2:0.25" and resolved["sweep"]["cfg"] == [-1.0, 2.0]
    cli.main(
        ["sweep", "--family", "toy", "--base", "b.pt", "--self", "r", "--sweep.w", "-1,-0.5", "--dry-run"]
    )
    assert yaml.safe_load(capsys.readouterr().out)["sweep"]["w"] == "-1,-0.5"
    cli.main(["merge", "--base", "b.pt", "--self", "s.pt", "--w", "-1", "--out", "m.pt", "--dry-run"])
    assert yaml.safe_load(capsys.readouterr().out)["merge"]["w"] == -1.0
    cli.main(["finetune", "--family", "toy", "--images", "16", "--finetune.seed", "-3", "--dry-run"])
    assert yaml.safe_load(capsys.readouterr().out)["finetune"]["seed"] == -3
    code, captured = _exit(
        ["finetune", "--family", "toy", "--images", "16", "--lr", "-1e-5", "--dry-run"], capsys
    )
    assert (
        code == 2 and captured.err == "error: finetune.lr and finetune.ramp_images must be >= 0\n"
    )  # parsed, then refused


def test_no_flag_is_a_prefix_of_a_torchrun_option():
    """torchrun's parser takes any unambiguous prefix of its own options, even after `-m neon.cli`."""
    from torch.distributed import run

    theirs = {o for a in run.get_args_parser()._actions for o in a.option_strings if o.startswith("--")}
    parser = cli._parser()
    verbs = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    swallowed = {}
    for name, sub in verbs.choices.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            spellings = [o for o in action.option_strings if o.startswith("--")]
            safe = [o for o in spellings if not any(t.startswith(o) for t in theirs)]
            if spellings and not safe:
                swallowed[f"{name} {spellings[0]}"] = [t for t in theirs if t.startswith(spellings[0])]
            # the first spelling (the one the help shows) must be safe under torchrun
            if spellings and any(t.startswith(spellings[0]) for t in theirs):
                swallowed[f"{name} {spellings[0]}"] = "shown first"
    assert not swallowed, swallowed


def test_old_spellings_still_work(tmp_path, capsys):
    cli.main(
        [
            "sample",
            "--family",
            "toy",
            "--ckpt",
            "b.pt",
            "--out",
            str(tmp_path / "S"),
            "--num",
            "12",
            "--dry-run",
        ]
    )
    assert yaml.safe_load(capsys.readouterr().out)["synthetic"]["num"] == 12
    cli.main(["fid", "--images", "a.npz", "--ref", "r.npz", "--pr", "real.npz", "--dry-run"])
    assert yaml.safe_load(capsys.readouterr().out)["pr"] == "real.npz"


def test_usage_errors_are_one_line(capsys):
    code, captured = _exit(["sample", "--num-images"], capsys)
    assert (
        code == 2
        and captured.err.count("\n") == 1
        and captured.err.startswith("error: argument --num-images")
    )


def test_a_bug_is_one_line_with_exit_1_and_neon_debug_shows_the_traceback(monkeypatch, capsys):
    def broken(raw, dry_run):
        raise ValueError("something inside broke")

    monkeypatch.setattr(verbs, "cmd_merge", broken)
    argv = ["merge", "--base", "a.pt", "--self", "b.pt", "--w", "1", "--out", "c.pt"]
    code, captured = _exit(argv, capsys)
    assert code == 1 and captured.err.count("\n") == 1
    assert captured.err.startswith("error: internal error: ValueError: something inside broke")
    assert "NEON_DEBUG=1" in captured.err
    monkeypatch.setenv("NEON_DEBUG", "1")
    with pytest.raises(ValueError):
        cli.main(argv)


def test_neon_debug_shows_the_traceback_of_a_user_error(tmp_path):
    result = run_neon(
        "merge",
        "--base",
        tmp_path / "none.pt",
        "--self",
        tmp_path / "none.pt",
        "--w",
        "1",
        "--out",
        tmp_path / "m.pt",
        env={"NEON_DEBUG": "1"},
    )
    assert (
        result.returncode == 1
        and "Traceback" in result.stderr
        and "NeonError: no such checkpoint" in result.stderr
    )


def test_a_torn_jsonl_line_is_skipped_and_dropped_before_the_next_append(tmp_path, caplog):
    path = str(tmp_path / "results.jsonl")
    files.append_jsonl(path, {"w": 0.5, "fid": 1.0})
    with open(path, "a") as f:
        f.write('{"w": 1.0, "fi')  # a killed append
    assert files.read_jsonl(path) == [{"w": 0.5, "fid": 1.0}] and "line 2 is not a JSON record" in caplog.text
    files.append_jsonl(path, {"w": 1.5, "fid": float("nan"), "nested": [float("inf"), 2.0]})
    assert files.read_jsonl(path) == [{"w": 0.5, "fid": 1.0}, {"w": 1.5, "fid": None, "nested": [None, 2.0]}]
    assert [json.loads(line) for line in open(path)] == files.read_jsonl(path)  # every line a record (pandas)
    assert "dropped its torn last line" in caplog.text
    assert all("NaN" not in line and "Infinity" not in line for line in open(path))


def test_a_sweep_resumes_over_a_torn_results_line(tmp_path, base_ckpt, synthetic_set, capsys):
    run = tmp_path / "run"
    cli.main(
        [
            "finetune",
            "--family",
            "toy",
            "--ckpt",
            base_ckpt,
            "--data",
            synthetic_set,
            "--out",
            str(run),
            "--images",
            "32",
            "--batch-size",
            "16",
        ]
    )
    args = [
        "sweep",
        "--family",
        "toy",
        "--base",
        base_ckpt,
        "--self",
        str(run),
        "--w",
        "0:1:0.5",
        "--num-images",
        "16",
        "--batch-size",
        "16",
        "--out",
        str(tmp_path / "sweep"),
    ]
    cli.main(args)
    results = tmp_path / "sweep" / "results.jsonl"
    lines = results.read_text().splitlines()
    results.write_text(
        "\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2]
    )  # the last record torn
    capsys.readouterr()
    cli.main(args)
    records = files.read_jsonl(str(results))
    assert len(results.read_text().splitlines()) == len(records)  # the torn line is gone from the file
    redone = {k: v for k, v in records[-1].items() if k != "seconds"}
    assert len(records) == len(lines) and redone == {
        k: v for k, v in json.loads(lines[-1]).items() if k != "seconds"
    }


def test_stale_temporaries_of_a_killed_merge_are_removed(tmp_path):
    base = save_base(tmp_path / "base.pt")
    out = tmp_path / "neon.pt"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    stale = tmp_path / f".neon.pt.{files._HOST}-{pid}-0123abcd.tmp.pt"
    alive = tmp_path / f".neon.pt.{files._HOST}-{os.getpid()}-0123abcd.tmp.pt"  # a writer still running
    other_host = tmp_path / f".neon.pt.elsewhere-{pid}-0123abcd.tmp.pt"
    for path in (stale, alive, other_host):
        path.write_bytes(b"half a checkpoint")
    cli.main(["merge", "--base", base, "--self", base, "--w", "0.5", "--out", str(out)])
    assert out.exists() and not stale.exists() and alive.exists() and other_host.exists()


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path, base_ckpt):
    out = tmp_path / "S"
    sample = ("sample", "--family", "toy", "--ckpt", base_ckpt, "--out", out, "--num-images", "8",
              "--batch-size", "8", "--synthetic.labels", "none")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from neon.io import files\n"
                "with files.claim(sys.argv[1], 'neon sample'):\n"
                "    print('held', flush=True); time.sleep(60)\n"
            ),
            str(out),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run_neon(*sample)
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert f"is in use by neon sample (pid {holder.pid} on " in result.stderr
        assert sorted(os.listdir(out)) == [files.LOCK]
    finally:
        holder.kill()
        holder.wait()
    result = run_neon(*sample)  # a dead holder's lock is free
    assert result.returncode == 0, result.stderr
    assert files.LOCK not in os.listdir(out)


def test_a_failed_first_sample_does_not_block_the_corrected_rerun(tmp_path, base_ckpt, capsys):
    out = tmp_path / "S"
    out.mkdir()  # made by the user: it stays, and so does what the failed run wrote into it
    bad = nan_ckpt(str(tmp_path))
    args = [
        "sample",
        "--family",
        "toy",
        "--out",
        str(out),
        "--num-images",
        "16",
        "--batch-size",
        "8",
        "--shard-size",
        "8",
        "--synthetic.labels",
        "none",
    ]
    code, captured = _exit(args + ["--ckpt", bad], capsys)
    assert code == 2 and "non-finite samples" in captured.err and "first at seed 0" in captured.err
    cli.main(args + ["--ckpt", base_ckpt, "--sampler.zeta", "1.1"])  # other base, other sampler: accepted
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampler"]["zeta"] == 1.1 and len(manifest["shards"]) == 2


def test_merge_allow_nonfinite_writes_what_it_is_told(tmp_path):
    base = save_base(tmp_path / "base.pt")
    bad = nan_ckpt(str(tmp_path))
    out = tmp_path / "m.pt"
    cli.main(["merge", "--base", base, "--self", bad, "--w", "0.5", "--out", str(out), "--allow-nonfinite"])
    merged = read_checkpoint(toy, str(out)).weights
    assert all(torch.isnan(v).all() for v in merged.values() if v.is_floating_point())


def test_merge_overflow_names_the_dtype_and_the_tensor(tmp_path, capsys):
    base = save_base(tmp_path / "base.pt")
    code, captured = _exit(
        ["merge", "--base", base, "--self", base, "--w", "1e39", "--out", str(tmp_path / "m.pt")], capsys
    )
    assert code == 2 and "overflows float32 in " in captured.err and not (tmp_path / "m.pt").exists()
    assert math.isfinite(1e39)  # finite as a Python float: only the float32 result is not


def test_legacy_torch_save_files_are_read_as_base_self_and_state(tmp_path, base_ckpt, synthetic_set, capsys):
    """Older checkpoints are not zip files: they cannot be memory-mapped, so they are read whole."""
    legacy = str(tmp_path / "legacy.pt")
    torch.save(checkpoint.read(base_ckpt).data, legacy, _use_new_zipfile_serialization=False)
    cli.main(["merge", "--base", legacy, "--self", legacy, "--w", "1", "--out", str(tmp_path / "m.pt")])
    one, two = read_checkpoint(toy, str(tmp_path / "m.pt")).weights, read_checkpoint(toy, base_ckpt).weights
    assert all(torch.equal(one[k], two[k]) for k in two)  # θ + 1 · (θ − θ) = θ
    run = tmp_path / "run"
    args = [
        "finetune",
        "--family",
        "toy",
        "--ckpt",
        legacy,
        "--data",
        synthetic_set,
        "--out",
        str(run),
        "--batch-size",
        "16",
    ]
    cli.main(args + ["--images", "16"])
    state = checkpoint.read_state(str(run / "state-latest.pt"))
    torch.save(state, str(run / "state-latest.pt"), _use_new_zipfile_serialization=False)
    os.rename(run / "snapshot-0000000016.pt", run / "zip.pt")
    torch.save(
        torch.load(run / "zip.pt"), str(run / "snapshot-0000000016.pt"), _use_new_zipfile_serialization=False
    )
    os.remove(run / "zip.pt")
    cli.main(args + ["--images", "32"])  # resumed from the legacy state (read with mmap asked for)
    assert checkpoint.read_state(str(run / "state-latest.pt"))["images_seen"] == 32
    cli.main(
        [
            "sweep",
            "--family",
            "toy",
            "--base",
            legacy,
            "--self",
            str(run),
            "--w",
            "0,1",
            "--num-images",
            "16",
            "--batch-size",
            "16",
            "--out",
            str(tmp_path / "sweep"),
        ]
    )
    assert len(files.read_jsonl(str(tmp_path / "sweep" / "results.jsonl"))) == 3
