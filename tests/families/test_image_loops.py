"""The whole Neon loop through the CLI on tiny image models (EDM, VAR), and world-size independence
of their synthetic sets."""

import json
import os

import pytest
import torch

from neon import checkpoint, cli
from neon import family as registry
from tests.dist.test_world_size import TORCHRUN, _shards, _torchrun

SAMPLERS = {"edm": ["--sampler.num_steps", "3"], "var": ["--sampler.top_k", "20"]}


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_files(name, tmp_path):
    """A tiny model of the family saved as its native checkpoint (and its codec, if it has one)."""
    fam = registry.get(name)
    model = fam.tiny(0)
    base = str(tmp_path / f"{name}-base.pt")
    fam.save(model.net.state_dict(), base, like=model)
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
    cli.main(["sample", *common, "--ckpt", base, "--out", S, "--num", "24", "--batch-size", "12", "--shard-size", "12",
              *SAMPLERS[name]])
    cli.main(["finetune", *common, "--ckpt", base, "--data", S, "--out", run, "--images", "16", "--batch-size", "8",
              "--lr", "1e-4", "--finetune.grad_clip", "2.0"])
    snapshot = os.path.join(run, "snapshot-0000000016.pt")
    merged = str(tmp_path / "neon.pt")
    cli.main(["merge", "--base", base, "--self", snapshot, "--w", "0.5", "--out", merged])
    base_sd, self_sd = checkpoint.read(base).weights, checkpoint.read(snapshot).weights
    merged_sd = checkpoint.read(merged).weights
    changed = [k for k, v in base_sd.items() if v.is_floating_point() and torch.isfinite(v).all()
               and not torch.equal(self_sd[k], v)]
    assert changed and all(torch.equal(merged_sd[k], (1.5 * base_sd[k].float() - 0.5 * self_sd[k].float()).to(base_sd[k].dtype))
                           for k in changed)
    cli.main(["sample", *common, "--ckpt", merged, "--out", str(tmp_path / "S_neon"), "--num", "24",
              "--batch-size", "12", "--shard-size", "12", *SAMPLERS[name]])
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
    args = ["sample", "--family", name, *codec, "--ckpt", base, "--synthetic.num", "20", "--batch-size", "4",
            "--shard-size", "5", *SAMPLERS[name]]
    cli.main(args + ["--out", str(tmp_path / "one")])
    _torchrun(*args, "--out", tmp_path / "two")
    assert _shards(tmp_path / "one") == _shards(tmp_path / "two") and len(_shards(tmp_path / "one")) == 4
