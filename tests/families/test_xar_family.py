"""The xAR adapter: the whole loop through the CLI on a tiny model, world-size independence of its
synthetic set, checkpoint wrappings, refused files, the buffers a merge must not move, calculate_fid."""

import argparse
import dataclasses
import json
import os

import pytest
import torch
import torch.distributed as dist

from neon import cli, merge
from neon.errors import NeonError
from neon.family import read_checkpoint, write_checkpoint
from neon.io import checkpoint
from neon.toy import appendix
from tests.dist.test_world_size import TORCHRUN, _shards, _torchrun
from xAR import calculate_fid
from xAR.family import PRESETS, TINY, XARNet, build_vae, family, infer_arch, infer_vae
from xAR.models import kl16

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = ["--sampler.num_steps", "3"]
MARKER = "pickle-code-ran"


CODEC_NAME = "kl16.ckpt"  # the VAE file's upstream name


def _tiny_files(tmp_path, seed=0):
    """The tiny model's θ in our container and its VAE laid out as kl16.ckpt is ({'model': state dict})."""
    model = family.tiny(seed)
    base, codec = str(tmp_path / "xar-base.pt"), str(tmp_path / CODEC_NAME)
    write_checkpoint(family, model.net.state_dict(), base, like=model)
    checkpoint.write({"model": model.codec.state_dict()}, codec)
    return model, base, codec


def _result(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def drawn(tmp_path_factory, inception_file):
    """The tiny model's files, a 12-image synthetic set S of it (3 steps, the default cfg, batches of 6)
    and the reference statistics of S: shared by the loop and calculate_fid."""
    tmp_path = tmp_path_factory.mktemp("xar")
    with appendix.one_thread():
        model, base, codec = _tiny_files(tmp_path)
        S, ref = str(tmp_path / "S"), str(tmp_path / "ref.npz")
        cli.main(
            [
                "sample",
                "--family",
                "xar",
                "--model.codec",
                codec,
                "--ckpt",
                base,
                "--out",
                S,
                "--num",
                "12",
                "--batch-size",
                "6",
                "--shard-size",
                "6",
                *STEPS,
            ]
        )
        cli.main(["fid-stats", "--images", S, "--out", ref, "--inception-weights", inception_file])
    return model, base, codec, S, ref


def test_neon_loop_through_the_cli(drawn, tmp_path, capsys, inception_file):
    model, base, codec, S, ref = drawn
    common = ["--family", "xar", "--model.codec", codec, *STEPS]
    run = str(tmp_path / "run")
    fid_flags = ["--inception-weights", inception_file, "--batch-size", "8"]
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
            "8",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--finetune.ema_beta",
            "0.5",
            "--finetune.grad_clip",
            "1.0",
        ]
    )
    snapshot = os.path.join(run, "snapshot-0000000008.pt")
    merged = str(tmp_path / "neon.pt")
    cli.main(
        ["merge", "--base", base, "--self", snapshot, "--w", "1.4", "--out", merged]
    )  # family from the file
    base_sd, self_sd = (read_checkpoint(family, p).weights for p in (base, snapshot))
    merged_sd = read_checkpoint(family, merged).weights
    assert read_checkpoint(family, snapshot).weights_key == ("model_ema",)
    changed = [k for k, v in base_sd.items() if not torch.equal(self_sd[k], v)]
    assert changed and all(torch.equal(merged_sd[k], 2.4 * base_sd[k] - 1.4 * self_sd[k]) for k in changed)
    buffers = [k for k, _ in model.net.named_buffers()]
    assert not set(changed) & set(buffers)  # fine-tuning leaves the mask and RoPE tables alone
    assert torch.equal(merged_sd["mask"], base_sd["mask"])  # −inf: copied from the base
    # The finite RoPE tables are extrapolated and move by float32 rounding; loading puts them back.
    assert any(not torch.equal(merged_sd[k], base_sd[k]) for k in buffers)
    loaded = family.load(merged, codec=codec).net.state_dict()
    assert all(torch.equal(loaded[k], base_sd[k]) for k in buffers)
    assert all(torch.equal(loaded[k], merged_sd[k]) for k in base_sd if k not in buffers)

    sweep = str(tmp_path / "sweep")
    capsys.readouterr()
    cli.main(
        [
            "sweep",
            *common,
            "--base",
            base,
            "--self",
            run,
            "--w",
            "1.4",
            "--sweep.cfg",
            "[1.5]",
            "--num",
            "4",
            "--ref",
            ref,
            "--out",
            sweep,
            *fid_flags,
        ]
    )
    summary = _result(capsys)
    records = [json.loads(line) for line in open(os.path.join(sweep, "results.jsonl"))]
    assert [(r["snapshot"], r["w"], r["cfg"]) for r in records] == [("base", 0.0, 1.5), (snapshot, 1.4, 1.5)]
    assert summary["fid"] == min(r["fid"] for r in records) and all(r["fid"] > 0 for r in records)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_two_processes_write_the_same_synthetic_set(tmp_path):
    _, base, codec = _tiny_files(tmp_path)
    args = [
        "sample",
        "--family",
        "xar",
        "--model.codec",
        codec,
        "--ckpt",
        base,
        "--synthetic.num",
        "8",
        "--batch-size",
        "2",
        "--shard-size",
        "4",
        *STEPS,
    ]
    cli.main(args + ["--out", str(tmp_path / "one")])
    _torchrun(*args, "--out", tmp_path / "two")
    assert _shards(tmp_path / "one") == _shards(tmp_path / "two") and len(_shards(tmp_path / "one")) == 2


def test_every_checkpoint_wrapping_loads_and_the_ema_comes_first(tmp_path):
    model, base, codec = _tiny_files(tmp_path)
    sd, other = model.net.state_dict(), family.tiny(1).net.state_dict()
    args = argparse.Namespace(model="xar_base", blr=1e-6, epochs=250)
    layouts = {
        "flat.pth": sd,
        "ema.pth": {"model_ema": sd, "epoch": 3},
        "state_dict.pth": {"state_dict": sd},
        "args.pth": {"model_ema": sd, "model": other, "args": args},
    }
    for name, data in layouts.items():
        checkpoint.write(data, str(tmp_path / name))
        loaded = family.load(str(tmp_path / name), codec=codec)
        assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in sd.items()), name
        assert not loaded.net.training and not any(p.requires_grad for p in loaded.net.parameters())
        assert loaded.image_size == 32  # the token grid is 16×16, the VAE's stride is 2
    assert checkpoint.read(str(tmp_path / "args.pth"), family.format).data["args"] == vars(
        args
    )  # data, not code
    assert family.load(str(tmp_path / "flat.pth"), codec=codec).arch == {
        **infer_arch(sd),
        "img_size": 32,
        "vae_stride": 2,
    }
    with pytest.raises(NeonError, match=r"arch expects 256 px images at stride 16, but the VAE has stride 2"):
        family.load(str(tmp_path / "flat.pth"), "xar_base", codec=codec)
    with pytest.raises(NeonError, match="no KL-16 VAE checkpoint at"):
        family.load(base, codec=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_arch_is_inferred_from_official_weights(name):
    with torch.device("meta"):
        net = XARNet(**PRESETS[name])
    assert infer_arch(net.state_dict()) == PRESETS[name]


def test_kl16_config_is_inferred_from_its_weights():
    with torch.device("meta"):
        vae = kl16()
    config = infer_vae(vae.state_dict())
    assert config == {
        "embed_dim": 16,
        "ch_mult": [1, 1, 2, 2, 4],
        "ch": 128,
        "num_res_blocks": 2,
        "use_variational": True,
    }
    shapes = {k: v.shape for k, v in vae.state_dict().items()}
    assert {k: v.shape for k, v in build_vae(config).state_dict().items()} == shapes


class _Evil:
    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


def test_malicious_pickle_in_a_pth_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, _, codec = _tiny_files(tmp_path)
    path = str(tmp_path / "evil.pth")
    torch.save({"model_ema": model.net.state_dict(), "args": _Evil()}, path)
    with pytest.raises(NeonError, match=r"cannot read checkpoint .*evil.pth: ") as error:
        family.load(path, codec=codec)
    assert "\n" not in str(error.value) and not (tmp_path / MARKER).exists()


def test_vae_keys_that_do_not_fit_are_named(tmp_path):
    model, base, _ = _tiny_files(tmp_path)
    vae_sd = model.codec.state_dict()
    extra, short = str(tmp_path / "extra.pth"), str(tmp_path / "short.pth")
    checkpoint.write({"model": {**vae_sd, "loss.logvar": torch.zeros(())}}, extra)
    checkpoint.write({"model": {k: v for k, v in vae_sd.items() if k != "decoder.conv_out.bias"}}, short)
    with pytest.raises(
        NeonError, match=r"extra.pth does not fit the KL-16 VAE: unexpected keys: loss.logvar$"
    ):
        family.load(base, codec=extra)
    with pytest.raises(NeonError, match=r"missing keys: decoder.conv_out.bias$"):
        family.load(base, codec=short)


def test_fewer_than_three_steps_are_refused(tmp_path, capsys):
    with pytest.raises(NeonError, match="xAR needs num_steps >= 3, got 2"):
        family.Sampler(num_steps=2)
    _, base, codec = _tiny_files(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            [
                "sample",
                "--family",
                "xar",
                "--model.codec",
                codec,
                "--ckpt",
                base,
                "--out",
                str(tmp_path / "S"),
                "--num",
                "2",
                "--sampler.num_steps",
                "2",
            ]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "num_steps >= 3" in err[0]


def test_merged_buffers_are_the_base_s_and_foreign_tables_are_refused():
    base, other = family.tiny(0).net, family.tiny(1).net
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    merged = merge.extrapolate(base_sd, other.state_dict(), 1.4)
    other.load_state_dict(merged)  # as the sweep loads a merge in memory
    for name, value in other.named_buffers():
        assert torch.equal(value, base_sd[name]), name
    k = "decoder_blocks.0.mlp.fc2.weight"
    assert torch.equal(other.state_dict()[k], merged[k]) and not torch.equal(merged[k], base_sd[k])
    damaged = {
        **base_sd,
        "encoder_blocks.0.attn.rope.freqs_cos": base_sd["encoder_blocks.0.attn.rope.freqs_cos"] + 0.1,
    }
    with pytest.raises(
        NeonError, match=r"encoder_blocks.0.attn.rope.freqs_cos differs from the RoPE table by 0.1"
    ):
        other.load_state_dict(damaged)


def test_loss_draws_only_from_its_generator():
    model = family.tiny(0)
    images = torch.randint(
        0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    labels = torch.tensor([1, -1, 9])
    model.net.eval()  # no dropout: the generator decides everything
    losses = [family.loss(model, images, labels, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*losses) and losses[0].ndim == 0
    assert not torch.equal(losses[0], family.loss(model, images, labels, torch.Generator().manual_seed(6)))
    with pytest.raises(NeonError, match=r"class labels must be in \[0, 10\)"):
        family.loss(model, images, torch.tensor([1, 2, 10]), torch.Generator())


def test_loss_runs_through_a_ddp_wrapper(tmp_path):
    """The core's fine-tune wraps model.net in DDP: the loss must call the wrapper's forward, which is
    `velocity`, and give what the bare network gives."""
    model = family.tiny(0)
    images = torch.randint(
        0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    labels = torch.tensor([3, 4])
    model.net.eval().requires_grad_(True)
    bare = family.loss(model, images, labels, torch.Generator().manual_seed(0))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = dataclasses.replace(model, net=torch.nn.parallel.DistributedDataParallel(model.net))
        loss = family.loss(wrapped, images, labels, torch.Generator().manual_seed(0))
        loss.backward()
    finally:
        dist.destroy_process_group()
    assert torch.equal(loss, bare) and model.net.z_proj.weight.grad.abs().sum() > 0


def test_calculate_fid(drawn, capsys, inception_file):
    _, base, codec, _, ref = drawn
    capsys.readouterr()
    calculate_fid.main(
        [
            "--model_ckpt",
            base,
            "--vae_path",
            codec,
            "--cfg",
            "2.7",
            "--flow_steps",
            "3",
            "--num_images",
            "12",
            "--batch_size",
            "6",
            "--fid_stats",
            ref,
            "--seed",
            "0",
            "--is",
            "--inception_weights",
            inception_file,
        ]
    )
    result = _result(capsys)
    # the same seeds, labels, batches and sampler as the synthetic set: the FID of the set against itself
    assert result["seeds"] == [0, 12] and abs(result["fid"]) < 1e-6 and result["is"] > 0
    with pytest.raises(SystemExit) as exit_info:
        calculate_fid.main(
            [
                "--model_ckpt",
                base,
                "--vae_path",
                codec,
                "--cfg",
                "2.0",
                "--img_size",
                "256",
                "--fid_stats",
                ref,
            ]
        )
    assert exit_info.value.code == 2 and "makes 32 px images" in capsys.readouterr().err


def test_tiny_is_small_and_its_arch_is_recorded():
    model = family.tiny(0)
    assert sum(p.numel() for m in (model.net, model.codec) for p in m.parameters()) < 1_000_000
    assert model.arch == TINY and family.container(model, {})["arch"] == TINY
