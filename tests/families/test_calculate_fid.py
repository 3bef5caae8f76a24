"""The families' calculate_fid.py shims: the paper's flags, one JSON line, errors with exit code 2."""

import json

import pytest

from edm import calculate_fid as edm_fid
from neon import cli
from tests.families.test_image_loops import _tiny_files
from VAR import calculate_fid as var_fid

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(name, base, codec, tmp_path, inception_file, sampler):
    S = str(tmp_path / "S")
    cli.main(
        [
            "sample",
            "--family",
            name,
            *codec,
            "--ckpt",
            base,
            "--out",
            S,
            "--num",
            "12",
            "--batch-size",
            "12",
            *sampler,
        ]
    )
    ref = str(tmp_path / "ref.npz")
    cli.main(["fid-stats", "--images", S, "--out", ref, "--inception-weights", inception_file])
    return ref


def test_edm_calculate_fid(tmp_path, capsys, inception_file):
    base, _ = _tiny_files("edm", tmp_path)
    ref = _reference("edm", base, [], tmp_path, inception_file, ["--sampler.num_steps", "3"])
    capsys.readouterr()
    edm_fid.main(
        [
            "--network_pkl",
            base,
            "--ref",
            f"file://{ref}",
            "--seeds",
            "0-11",
            "--max_batch_size",
            "6",
            "--num_steps",
            "3",
            "--inception_weights",
            inception_file,
        ]
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the same seeds, labels and sampler as the synthetic set: the FID of the set against itself
    assert result["seeds"] == [0, 12] and abs(result["fid"]) < 1e-6
    # density/coverage against the set itself: every sample is its own real neighbour (Naeem et al.: 1, 1)
    edm_fid.main(
        [
            "--network_pkl",
            base,
            "--ref",
            ref,
            "--seeds",
            "0-11",
            "--max_batch_size",
            "6",
            "--num_steps",
            "3",
            "--inception_weights",
            inception_file,
            "--metrics",
            "fid,prdc",
            "--real",
            str(tmp_path / "S"),
        ]
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        result["coverage"] == 1.0 and result["density"] == pytest.approx(1.0) and result["precision"] == 1.0
    )
    with pytest.raises(SystemExit) as exit_info:
        edm_fid.main(["--network_pkl", base, "--ref", ref, "--seeds", "9-3"])
    assert exit_info.value.code == 2 and "the range is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        edm_fid.main(["--network_pkl", base, "--ref", ref, "--metrics", "fid,prdc"])
    assert exit_info.value.code == 2 and "set --real" in capsys.readouterr().err


def test_var_calculate_fid(tmp_path, capsys, inception_file):
    base, codec = _tiny_files("var", tmp_path)
    ref = _reference("var", base, codec, tmp_path, inception_file, ["--sampler.cfg", "1.5"])
    capsys.readouterr()
    var_fid.main(
        [
            "--var_ckpt",
            base,
            "--vae_ckpt",
            codec[1],
            "--N",
            "12",
            "--batch_size",
            "6",
            "--cfg",
            "1.5",
            "--fid_stats",
            ref,
            "--seed",
            "0",
            "--inception_weights",
            inception_file,
        ]
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_images"] == 12 and abs(result["fid"]) < 1e-6
    with pytest.raises(SystemExit) as exit_info:
        var_fid.main(["--var_ckpt", base, "--vae_ckpt", codec[1], "--img_size", "256", "--fid_stats", ref])
    assert exit_info.value.code == 2 and "makes 64 px images" in capsys.readouterr().err
