"""A family defined in tests/ (tests/families/custom_family.py) runs the whole loop through the CLI
with `--family module:attribute`, with no edit under neon/; and θ has one path: the sweep scores
exactly the tensors `neon merge` writes, although the family's files hold a decoy raw copy of them."""

import json

import pytest
import torch

from neon import cli, merge
from neon.family import read_checkpoint, write_checkpoint
from neon.metrics import inception, score, stats
from tests.conftest import run_neon
from tests.families.custom_family import family

SPEC = "tests.families.custom_family:family"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_family_from_tests_runs_sample_finetune_merge_sweep(tmp_path, capsys, inception_file):
    tiny = family.tiny(0)
    base, S, run = str(tmp_path / "base.pt"), str(tmp_path / "S"), str(tmp_path / "run")
    write_checkpoint(family, tiny.net.state_dict(), base, like=tiny)
    cli.main(
        [
            "sample",
            "--family",
            SPEC,
            "--ckpt",
            base,
            "--out",
            S,
            "--num",
            "16",
            "--batch-size",
            "8",
            "--shard-size",
            "8",
            "--synthetic.labels",
            "none",
        ]
    )
    cli.main(
        [
            "finetune",
            "--family",
            SPEC,
            "--ckpt",
            base,
            "--data",
            S,
            "--out",
            run,
            "--images",
            "32",
            "--batch-size",
            "8",
            "--lr",
            "1e-2",
        ]
    )
    snapshot = f"{run}/snapshot-0000000032.pt"
    ref = str(tmp_path / "ref.npz")
    cli.main(["fid-stats", "--images", S, "--out", ref, "--inception-weights", inception_file])
    merged = str(tmp_path / "neon.pt")
    cli.main(["merge", "--family", SPEC, "--base", base, "--self", snapshot, "--w", "0.5", "--out", merged])
    cli.main(
        [
            "sweep",
            "--family",
            SPEC,
            "--base",
            base,
            "--self",
            snapshot,
            "--w",
            "0.5",
            "--num",
            "8",
            "--batch-size",
            "8",
            "--ref",
            ref,
            "--inception-weights",
            inception_file,
            "--out",
            str(tmp_path / "sw"),
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = [json.loads(line) for line in open(tmp_path / "sw" / "results.jsonl")]
    assert [r["w"] for r in records] == [0.0, 0.5] and summary["w"] in (0.0, 0.5)

    # θ, not the decoy: the merge is (1 + w) θ_base − w θ_self of the `theta` entries ...
    theta_base, theta_self = (read_checkpoint(family, p).weights for p in (base, snapshot))
    written = read_checkpoint(family, merged)
    expected = merge.extrapolate(theta_base, theta_self, 0.5)
    assert all(torch.equal(written.weights[k], v) for k, v in expected.items())
    assert not torch.equal(written.data["model"]["map.bias"], written.weights["map.bias"])
    # ... and the sweep scored those very tensors: the merged file's samples on the sweep's seeds
    # (same batches, same threads: bitwise) give the FID it recorded for w = 0.5.
    fid_conf = inception.FidConfig(inception_weights=inception_file)
    again = score.generate_and_score(
        family, family.load(merged), family.Sampler(), (1_000_000, 8), 8, fid_conf, stats.load(ref)
    )
    assert again["fid"] == records[1]["fid"]


def test_a_file_of_a_family_that_is_not_installed_needs_its_family(tmp_path):
    tiny = family.tiny(0)
    base = str(tmp_path / "base.pt")
    write_checkpoint(family, tiny.net.state_dict(), base, like=tiny)
    result = run_neon("merge", "--base", base, "--self", base, "--w", "0.5", "--out", tmp_path / "neon.pt")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "family 'custom', which is not installed; pass --family" in result.stderr
    assert not (tmp_path / "neon.pt").exists()
