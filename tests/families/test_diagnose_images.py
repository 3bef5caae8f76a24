"""`neon diagnose` on the image families (issue #4: "works for any family through the protocol"),
with real images from an `.npz`, labelled or not."""

import json

import numpy as np
import pytest

from neon import cli, synthetic
from tests.families.test_image_loops import SAMPLERS, _tiny_files

pytestmark = pytest.mark.usefixtures("one_thread")


def _diagnose(name, base, codec, real, S, capsys):
    capsys.readouterr()
    cli.main(
        [
            "diagnose",
            "--family",
            name,
            *codec,
            "--ckpt",
            base,
            "--real",
            real,
            "--synthetic",
            S,
            "--batches",
            "4",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, json.loads(lines[-1])


@pytest.mark.parametrize("name", ["edm", "var"])
def test_diagnose_image_family_with_labelled_real_images(name, tmp_path, capsys):
    base, codec = _tiny_files(name, tmp_path)
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
            "16",
            "--batch-size",
            "16",
            "--shard-size",
            "16",
            *SAMPLERS[name],
        ]
    )
    data = synthetic.read(S)
    assert len(set(data.labels.tolist())) > 1  # both tiny models are class-conditional
    images = data.read(range(len(data))).permute(0, 2, 3, 1).numpy()
    real = str(tmp_path / "real.npz")
    np.savez(real, arr_0=images, labels=data.labels.numpy())
    lines, result = _diagnose(name, base, codec, real, S, capsys)
    assert set(result) == {"cos_p", "low", "high", "advice"} and lines[0].startswith("cos_P = ")
    assert -1 <= result["low"] <= result["high"] <= 1 and -1 <= result["cos_p"] <= 1
    expected = "extrapolate" if result["high"] < 0 else "interpolate" if result["low"] > 0 else "inconclusive"
    assert result["advice"] == expected
    if name == "var":  # the same images on both sides: the two gradients nearly coincide
        assert result["cos_p"] > 0.8, result
    unlabelled = str(tmp_path / "unlabelled.npz")
    np.savez(unlabelled, arr_0=images)
    if name == "var":  # unlabelled images are VAR's null class
        assert _diagnose(name, base, codec, unlabelled, S, capsys)[1]["cos_p"] > 0.5
    else:  # the conditional EDM cannot take them: one line, exit 2
        with pytest.raises(SystemExit) as exit_info:
            _diagnose(name, base, codec, unlabelled, S, capsys)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and "\n" not in err
        assert (
            err == "error: class labels must be in [0, 10) for this conditional model "
            "(unlabelled images carry -1)"
        )
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, arr_0=images, labels=data.labels.numpy()[:3])
    with pytest.raises(SystemExit) as exit_info:
        _diagnose(name, base, codec, bad, S, capsys)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err == f"error: {bad}['labels'] must be 16 class labels (integers >= 0), got int64 of shape [3]"
