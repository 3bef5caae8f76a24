"""The `neon` command end to end on the toy family, and its error contract."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from neon import cli
from neon.family import names as family_names
from neon.family import read_checkpoint
from neon.io import checkpoint
from neon.toy.family import family as toy_family
from tests.conftest import REPO, run_neon, save_base


def test_sample_finetune_merge_sweep_through_the_cli(tmp_path, capsys):
    base = save_base(tmp_path / "base.pt")
    s, r = tmp_path / "S", tmp_path / "run"
    common = ["--family", "toy"]
    cli.main(
        [
            "sample",
            *common,
            "--ckpt",
            base,
            "--out",
            str(s),
            "--num",
            "64",
            "--batch-size",
            "32",
            "--shard-size",
            "32",
            "--sampler.zeta",
            "1.1",
            "--synthetic.labels",
            "none",
        ]
    )
    assert yaml.safe_load(open(s / "config.resolved.yaml"))["sampler"]["zeta"] == 1.1
    cli.main(
        [
            "finetune",
            *common,
            "--ckpt",
            base,
            "--data",
            str(s),
            "--out",
            str(r),
            "--images",
            "128",
            "--batch-size",
            "32",
            "--lr",
            "1e-3",
            "--snapshot-every",
            "64",
            "--ema-beta",
            "0.5",
        ]
    )
    assert sorted(os.listdir(r)) == [
        "config.resolved.yaml",
        "log.txt",
        "snapshot-0000000064.pt",
        "snapshot-0000000128.pt",
        "state-latest.pt",
        "stats.jsonl",
    ]
    cli.main(
        [
            "merge",
            "--base",
            base,
            "--self",
            str(r / "snapshot-0000000128.pt"),
            "--w",
            "0.5",
            "--out",
            str(tmp_path / "neon.pt"),
        ]
    )
    a, b = checkpoint.read(base), read_checkpoint(toy_family, str(r / "snapshot-0000000128.pt"))
    merged = checkpoint.read(str(tmp_path / "neon.pt"))
    assert merged.data.keys() == a.data.keys() and merged.weights_key == ("model",)
    ema = checkpoint.read_state(str(r / "state-latest.pt"))["ema"]
    for k, v in a.weights.items():
        assert torch.equal(b.weights[k], ema[k]) and torch.equal(merged.weights[k], 1.5 * v - 0.5 * ema[k])
    cli.main(
        [
            "sweep",
            *common,
            "--base",
            base,
            "--self",
            str(r),
            "--w",
            "0:1:0.5",
            "--num",
            "32",
            "--batch-size",
            "32",
            "--out",
            str(tmp_path / "sweep"),
            "--sweep.sampler",
            "{zeta: 1.0}",
        ]
    )
    records = [json.loads(line) for line in open(tmp_path / "sweep" / "results.jsonl")]
    assert len(records) == 1 + 2 * 2 and all(r["fid"] > 0 for r in records)
    capsys.readouterr()
    cli.main(
        [
            "sweep",
            *common,
            "--base",
            base,
            "--self",
            str(r),
            "--w",
            "0:1:0.5",
            "--num",
            "32",
            "--batch-size",
            "32",
            "--out",
            str(tmp_path / "sweep"),
            "--final-num",
            "16",
            "--sweep.final_seeds",
            "1",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lines = open(tmp_path / "sweep" / "results.jsonl")
    finals = {(x["snapshot"], x["w"]): x["fid"] for x in map(json.loads, lines) if x["num"] == 16}
    assert summary["final"]["base"]["fid"]["mean"] == finals[("base", 0.0)]
    assert summary["final"]["neon"]["fid"]["mean"] == finals[(summary["snapshot"], summary["w"])]


def test_dry_run_prints_the_resolved_recipe_and_writes_nothing(tmp_path, capsys):
    cli.main(
        [
            "finetune",
            "--family",
            "toy",
            "--ckpt",
            "b.pt",
            "--out",
            str(tmp_path / "r"),
            "--images",
            "64",
            "--batch-size",
            "32",
            "--finetune.lr",
            "2e-5",
            "--dry-run",
        ]
    )
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["finetune"]["lr"] == 2e-5 and resolved["finetune"]["total_images"] == 64
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["sample", "--family", "nope", "--ckpt", "x.pt", "--out", "o"],
            f"unknown family 'nope' (installed: {', '.join(family_names())}; "
            "or give package.module:attribute)",
        ),
        (
            ["sample", "--family", "toy", "--ckpt", "missing.pt", "--out", "o", "--num", "4"],
            "no such checkpoint: missing.pt",
        ),
        (["sample", "--family", "toy", "--ckpt", "x.pt", "--out", "o", "--num", "many"], None),
        (
            ["finetune", "--family", "toy", "--ckpt", "x.pt", "--images", "0", "--batch-size", "4"],
            "finetune.total_images and finetune.batch_size must be positive",
        ),
        (["sweep", "--family", "toy", "--base", "x.pt", "--self", "r", "--w", "1:0:1"], "bad w grid '1:0:1'"),
        (
            ["sweep", "--family", "toy", "--base", "x.pt", "--self", "r", "--is"],
            "sweep.inception_score and sweep.precision_recall score the final report: set sweep.final_num",
        ),
        (
            ["sweep", "--family", "toy", "--base", "x.pt", "--self", "r", "--final-num", "8", "--is"],
            "sweep.inception_score needs sweep.final_num >= 10",
        ),
        (["sample", "--family", "toy", "--sampler.zeta", "big"], "sampler.zeta: expected float, got 'big'"),
        (["merge", "--base", "a.pt", "--self", "b.pt", "--w", "nan", "--out", "c.pt"], "w must be finite"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    if message is not None:
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not os.path.exists(tmp_path / "o") and not os.path.exists("c.pt")


def test_merge_errors_leave_no_output(tmp_path):
    base = save_base(tmp_path / "base.pt")
    other = save_base(tmp_path / "ar.pt", kind="ar")
    out = tmp_path / "out.pt"
    result = run_neon("merge", "--base", base, "--self", other, "--w", "1", "--out", out)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "missing from self-trained" in result.stderr and not out.exists()
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    result = run_neon("merge", "--base", base, "--self", tmp_path / "corrupt.pt", "--w", "1", "--out", out)
    assert result.returncode == 2 and "cannot read checkpoint" in result.stderr and not out.exists()


def test_deterministic_flag_and_recipe_key(tmp_path, monkeypatch, capsys):
    from neon import distributed

    base = save_base(tmp_path / "base.pt")
    calls = []
    monkeypatch.setattr(distributed, "deterministic", lambda: calls.append(True))
    args = [
        "sample",
        "--family",
        "toy",
        "--ckpt",
        base,
        "--num",
        "8",
        "--batch-size",
        "8",
        "--shard-size",
        "8",
        "--synthetic.labels",
        "none",
    ]
    cli.main(args + ["--out", str(tmp_path / "plain")])
    resolved = yaml.safe_load(open(tmp_path / "plain" / "config.resolved.yaml"))
    assert calls == [] and resolved["deterministic"] is False
    cli.main(args + ["--out", str(tmp_path / "det"), "--deterministic"])
    resolved = yaml.safe_load(open(tmp_path / "det" / "config.resolved.yaml"))
    assert calls == [True] and resolved["deterministic"] is True
    recipe = tmp_path / "r.yaml"
    recipe.write_text("family: toy\ndeterministic: yes please\n")
    result = run_neon("finetune", "--config", recipe, "--dry-run")
    assert result.returncode == 2
    assert result.stderr == "error: deterministic: expected true or false, got 'yes please'\n"


def test_deterministic_mode_sets_what_gpu_reruns_need(monkeypatch):
    from neon import distributed

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    torch.use_deterministic_algorithms(False)
    distributed.deterministic()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    distributed.deterministic()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # the user's own setting wins


def test_ranks_but_the_first_log_warnings_only(monkeypatch):
    """Under torchrun the rank is known once the process group is up: logging is set up after it, so rank
    1 logs at WARNING (its INFO lines would repeat rank 0's)."""
    import logging

    from neon import distributed
    from neon.errors import run_command

    root = logging.getLogger()
    level, levels, started = root.level, [], []
    monkeypatch.setattr(distributed, "init", lambda: started.append(True))
    monkeypatch.setattr(distributed, "shutdown", lambda: None)
    monkeypatch.setattr(distributed, "rank", lambda: 1 if started else 0)
    try:
        run_command(lambda: levels.append(root.level))
    finally:
        root.setLevel(level)
    assert levels == [logging.WARNING]


class _Exited(Exception):
    pass


@pytest.mark.parametrize("body, status", [
    ("return", 0), ("user error", 2), ("stopped", 143), ("bug", 1)])
def test_a_torchrun_rank_ends_with_its_status_and_no_finalization(monkeypatch, capsys, body, status):
    """A rank that joined a process group leaves through `distributed.exit_process` with the status the
    command would have had, after leaving the group (a gloo worker thread can abort a finalizing
    interpreter)."""
    from neon import distributed, stop
    from neon.errors import NeonError, run_command

    events = []
    monkeypatch.setattr(distributed, "init", lambda: events.append("init"))
    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed, "barrier", lambda: events.append("barrier"))
    monkeypatch.setattr(distributed, "shutdown", lambda: events.append("shutdown"))

    def exit_process(code):
        events.append(code)
        raise _Exited

    monkeypatch.setattr(distributed, "exit_process", exit_process)

    def run():
        if body == "user error":
            raise NeonError("bad input")
        if body == "stopped":
            raise stop.Stopped("stopped at step 3", signal.SIGTERM)
        if body == "bug":
            raise KeyError("x")

    with pytest.raises(_Exited):
        run_command(run)
    assert events == ["init", "barrier", "shutdown", 0] if body == "return" else ["init", "shutdown", status]
    if body == "user error":
        assert capsys.readouterr().err == "error: bad input\n"


def test_exit_process_flushes_what_was_printed_and_exits_with_the_code(tmp_path):
    code = "import sys; from neon import distributed; print('kept', end=''); " \
           "sys.stderr.write('also'); distributed.exit_process(3)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (3, "kept", "also")


DRY_RUNS = {  # verb: (argv, {dotted key: value the printed YAML holds})
    "sample": (
        ["--family", "toy", "--ckpt", "b.pt", "--num", "12"],
        {"synthetic.num": 12, "model.ckpt": "b.pt"},
    ),
    "finetune": (
        ["--family", "toy", "--images", "64", "--lr", "2e-5"],
        {"finetune.total_images": 64, "finetune.lr": 2e-5},
    ),
    "merge": (
        ["--base", "b.pt", "--self", "s.pt", "--w", "-1", "--out", "m.pt"],
        {
            "family": None,
            "model.ckpt": "b.pt",
            "merge.self_trained": "s.pt",
            "merge.w": -1.0,
            "merge.out": "m.pt",
            "merge.format": "same",
            "merge.allow_nonfinite": False,
        },
    ),
    "sweep": (
        ["--family", "toy", "--base", "b.pt", "--self", "r", "--w", "-1:1:0.5"],
        {"sweep.w": "-1:1:0.5", "sweep.self_trained": "r"},
    ),
    "fid-stats": (
        ["--images", "a.npz", "--out", "s.npz", "--batch-size", "8"],
        {"images": "a.npz", "out": "s.npz", "fid.batch_size": 8},
    ),
    "fid": (
        ["--images", "a.npz", "--ref", "r.npz", "--is"],
        {"images": "a.npz", "ref": "r.npz", "is": True, "pr": None, "fid.batch_size": 64},
    ),
    "diagnose": (
        ["--family", "toy", "--ckpt", "b.pt", "--real", "toy:100", "--synthetic", "S", "--batches", "4"],
        {"family": "toy", "diagnose.real": "toy:100", "diagnose.synthetic": "S", "diagnose.batches": 4},
    ),
    "demo": (["--quick"], {"demo": "toy", "out": os.path.join("outputs", "demo"), "quick": True}),
    "report": (["sw"], {"sweep_dir": "sw"}),
    "plan": (
        [
            os.path.join(REPO, "configs", "toy", "ar_tau0.5.yaml"),
            "--gpus",
            "2",
            "--finetune.batch_size",
            "500",
        ],
        {"family": "toy", "finetune.batch_size": 500, "plan.gpus": 2, "plan.gpu_memory": 80.0},
    ),
}


def test_every_verb_has_a_dry_run_case():
    assert set(DRY_RUNS) == set(cli.VERBS)


@pytest.mark.parametrize("verb", DRY_RUNS)
def test_every_verb_dry_run_prints_its_resolved_mapping_as_yaml(verb, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, expected = DRY_RUNS[verb]
    cli.main([verb, *argv, "--dry-run"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert isinstance(resolved, dict)
    for key, value in expected.items():
        node = resolved
        for part in key.split("."):
            node = node[part]
        assert node == value, (key, node)
    assert os.listdir(tmp_path) == []  # a dry run writes nothing


def test_each_flag_sets_the_key_the_table_names(capsys):
    """The table is the one way from a flag to a key: every value flag of sample lands at its key."""
    values = {
        "--ckpt": "b.pt",
        "--out": "S",
        "--num-images": "7",
        "--batch-size": "3",
        "--seed": "5",
        "--shard-size": "2",
    }
    cli.main(["sample", "--family", "toy", *[t for pair in values.items() for t in pair], "--dry-run"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    for flag in cli.VERBS["sample"].flags:
        if flag.name in values:
            section, field = flag.key.split(".")
            assert str(resolved[section][field]) == values[flag.name], flag


def test_demo_names_an_installed_demo(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "no-such-demo", "--dry-run"])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: no demo 'no-such-demo' is installed (installed: toy")
