"""The whole Neon loop through the CLI on tiny image models (EDM, VAR), and world-size independence
of their synthetic sets."""

import json
import os

import numpy as np
import pytest
import torch

from neon import cli, synthetic
from neon import family as registry
from neon.family import write_checkpoint
from neon.io import checkpoint
from tests.dist.test_world_size import TORCHRUN, _shards, _torchrun

SAMPLERS = {"edm": ["--sampler.num_steps", "3"], "var": ["--sampler.top_k", "20"]}


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]


def _tiny_files(name, tmp_path):
    """A tiny model of the family saved as its native checkpoint (and its codec, if it has one)."""
    fam = registry.get(name)
    model = fam.tiny(0)
    base = str(tmp_path / f"{name}-base.pt")
    write_checkpoint(fam, model.net.state_dict(), base, like=model)
    flags = []
    if name == "var":
        codec = str(tmp_path / "vae.pt")
        checkpoint.write(model.codec.state_dict(), codec)
        flags = ["--model.codec", codec]
    return base, flags


@pytest.mark.parametrize("name", ["edm", "var"])
def test_neon_loop_through_the_cli(name, tmp_path, capsys, inception_file):
    base, codec = _tiny_files(name, tmp_path)
    common = ["--family", name, *codec]
    S, run = str(tmp_path / "S"), str(tmp_path / "run")
    cli.main(
        [
            "sample",
            *common,
            "--ckpt",
            base,
            "--out",
            S,
            "--num",
            "24",
            "--batch-size",
            "12",
            "--shard-size",
            "12",
            *SAMPLERS[name],
        ]
    )
    cli.main(
        [
            "finetune",
            *common,
            "--ckpt",
            base,
            "--data",
            S,
            "--out",
            run,
            "--images",
            "16",
            "--batch-size",
            "8",
            "--lr",
            "1e-4",
            "--finetune.grad_clip",
            "2.0",
        ]
    )
    snapshot = os.path.join(run, "snapshot-0000000016.pt")
    merged = str(tmp_path / "neon.pt")
    cli.main(["merge", "--base", base, "--self", snapshot, "--w", "0.5", "--out", merged])
    fam = registry.get(name)
    base_sd, self_sd = (
        registry.read_checkpoint(fam, base).weights,
        registry.read_checkpoint(fam, snapshot).weights,
    )
    merged_sd = registry.read_checkpoint(fam, merged).weights
    changed = [
        k
        for k, v in base_sd.items()
        if v.is_floating_point() and torch.isfinite(v).all() and not torch.equal(self_sd[k], v)
    ]
    assert changed and all(
        torch.equal(merged_sd[k], (1.5 * base_sd[k].float() - 0.5 * self_sd[k].float()).to(base_sd[k].dtype))
        for k in changed
    )
    cli.main(
        [
            "sample",
            *common,
            "--ckpt",
            merged,
            "--out",
            str(tmp_path / "S_neon"),
            "--num",
            "24",
            "--batch-size",
            "12",
            "--shard-size",
            "12",
            *SAMPLERS[name],
        ]
    )
    ref = str(tmp_path / "ref.npz")
    fid_flags = ["--inception-weights", inception_file, "--batch-size", "8"]
    cli.main(["fid-stats", "--images", S, "--out", ref, *fid_flags])
    capsys.readouterr()
    cli.main(["fid", "--images", str(tmp_path / "S_neon"), "--ref", ref, *fid_flags])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num"] == 24 and result["fid"] > 0


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
@pytest.mark.parametrize("name", ["edm", "var"])
def test_two_processes_write_the_same_synthetic_set(name, tmp_path):
    base, codec = _tiny_files(name, tmp_path)
    args = [
        "sample",
        "--family",
        name,
        *codec,
        "--ckpt",
        base,
        "--synthetic.num",
        "20",
        "--batch-size",
        "4",
        "--shard-size",
        "5",
        *SAMPLERS[name],
    ]
    cli.main(args + ["--out", str(tmp_path / "one")])
    _torchrun(*args, "--out", tmp_path / "two")
    assert _shards(tmp_path / "one") == _shards(tmp_path / "two") and len(_shards(tmp_path / "one")) == 4


def test_sweep_final_report_with_is_and_precision_recall_matches_neon_fid(tmp_path, capsys, inception_file):
    """The sweep's final points carry IS and precision/recall when asked, and the base's numbers are
    those `neon fid` gives for the same images (the base sampled on the final seed range)."""
    base, _ = _tiny_files("edm", tmp_path)
    common = ["--family", "edm", *SAMPLERS["edm"]]
    fid_flags = ["--inception-weights", inception_file, "--batch-size", "12"]
    S, run, real, ref = (str(tmp_path / name) for name in ("S", "run", "real.npz", "ref.npz"))
    S_final = str(tmp_path / "S_final")  # what the sweep's final report draws from the base
    cli.main(
        [
            "sample",
            *common,
            "--ckpt",
            base,
            "--out",
            S_final,
            "--num",
            "12",
            "--batch-size",
            "12",
            "--shard-size",
            "12",
            "--synthetic.seed_base",
            "2000000",
        ]
    )
    # the "real" images: half of those samples, half noise
    drawn = synthetic.read(S_final).read(range(6))
    np.savez(
        real,
        arr_0=torch.cat([drawn, torch.randint(0, 256, drawn.shape, dtype=torch.uint8)])
        .permute(0, 2, 3, 1)
        .numpy(),
    )
    cli.main(
        [
            "sample",
            *common,
            "--ckpt",
            base,
            "--out",
            S,
            "--num",
            "8",
            "--batch-size",
            "8",
            "--shard-size",
            "8",
        ]
    )
    cli.main(
        [
            "finetune",
            "--family",
            "edm",
            "--ckpt",
            base,
            "--data",
            S,
            "--out",
            run,
            "--images",
            "8",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
        ]
    )
    cli.main(["fid-stats", "--images", real, "--out", ref, *fid_flags])
    sweep_dir = str(tmp_path / "sweep")
    sweep = [
        "sweep",
        *common,
        "--base",
        base,
        "--self",
        run,
        "--w",
        "1",
        "--num",
        "4",
        "--final-num",
        "12",
        "--sweep.final_seeds",
        "1",
        "--ref",
        ref,
        "--out",
        sweep_dir,
        *fid_flags,
    ]
    cli.main(sweep)  # selection and final report without the extra metrics
    capsys.readouterr()
    cli.main([*sweep, "--is", "--precision-recall", real])  # the final points are redone with them
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = [json.loads(line) for line in open(os.path.join(sweep_dir, "results.jsonl"))]
    finals = {
        (r["snapshot"], r["w"]): r for r in records if r["num"] == 12
    }  # the newest record of each point
    assert len(records) == 2 + 2 * len(finals)
    assert all(
        {"is", "is_std", "precision", "recall"} <= set(r) and r["real"] == real for r in finals.values()
    )
    base_final = finals[("base", 0.0)]
    for metric in ("fid", "is", "is_std", "precision", "recall"):
        assert summary["final"]["base"][metric]["mean"] == base_final[metric]
    capsys.readouterr()
    cli.main(["fid", "--images", S_final, "--ref", ref, "--is", "--precision-recall", real, *fid_flags])
    direct = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for metric in ("fid", "is", "is_std", "precision", "recall"):
        assert base_final[metric] == pytest.approx(direct[metric], rel=1e-6, abs=1e-9), metric
