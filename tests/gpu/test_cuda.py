"""GPU checks, run by `scripts/gpu_check.sh` (`pytest -m gpu`); skipped where CUDA is absent.

Each family's tiny model samples on CUDA close to what it samples on the CPU: a seed's draws are made
on CPU generators and moved (`neon.family.Family.sample`), so only the kernels differ (float
tolerance, DESIGN.md Determinism). A family that draws on the device (`DRAWS_ON_DEVICE` of
tests/families/test_devices.py: VAR's token draws) has other draws on CUDA; for it the greedy
decoding (top_k=1), which the draws cannot change, is compared. Sampling under fp16/bf16
autocast and fine-tuning with `precision` fp16/bf16 run and stay finite; a merge and a sweep point
run on CUDA through the CLI.
"""

import json
import os

import pytest
import torch

from neon import cli, diagnose, finetune, synthetic
from neon import family as registry
from neon.family import write_checkpoint
from neon.io import checkpoint
from tests.conftest import save_base
from tests.families.test_devices import DRAWS_ON_DEVICE

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


def _to(model, device):
    model.net.to(device)
    if model.codec is not None:
        model.codec.to(device)
    return model


def _labels(model, n):
    return torch.arange(n) % model.num_classes if model.num_classes else torch.full((n,), -1)


@pytest.fixture(params=registry.names())
def fam(request):
    return registry.get(request.param)


def compared_sampler(fam):
    """The sampler settings under which CPU and CUDA samples of `fam` must agree: the default, or
    greedy decoding for a family that draws on the device."""
    return fam.Sampler(top_k=1) if fam.name in DRAWS_ON_DEVICE else fam.Sampler()


def test_tiny_model_samples_on_cuda_as_on_the_cpu(fam):
    model = fam.tiny(0)
    sampler = compared_sampler(fam)
    labels, seeds = _labels(model, 4), torch.arange(4) + 100
    on_cpu = fam.sample(model, labels, seeds, sampler)
    on_gpu = fam.sample(_to(model, CUDA), labels, seeds, sampler).cpu()
    assert on_gpu.shape == on_cpu.shape and on_gpu.dtype == on_cpu.dtype
    diff = (on_gpu.double() - on_cpu.double()).abs()
    if on_cpu.dtype == torch.uint8:  # TF32/fp16 kernels on the GPU: a few levels, on average well under one
        assert diff.mean() < 2.0 and diff.max() <= 64, (diff.mean(), diff.max())
    else:
        assert diff.max() < 1e-3, diff.max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sampling_under_autocast_is_finite(fam, dtype):
    model = _to(fam.tiny(0), CUDA)
    with torch.autocast("cuda", dtype=dtype):
        out = fam.sample(model, _labels(model, 4), torch.arange(4), fam.Sampler())
    assert out.is_cuda and (out.dtype == torch.uint8 or torch.isfinite(out).all())


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_finetune_with_autocast_runs_and_stays_finite(fam, precision, tmp_path):
    model = fam.tiny(0)
    conf = synthetic.SyntheticConfig(
        out=str(tmp_path / "S"),
        num=16,
        batch_size=8,
        shard_size=16,
        labels="balanced" if model.num_classes else "none",
    )
    for _ in synthetic.write(fam, _to(model, CUDA), fam.Sampler(), conf, "sha"):
        pass
    run = finetune.FinetuneConfig(
        data=conf.out, out=str(tmp_path / "run"), total_images=32, batch_size=8, lr=1e-4, precision=precision
    )
    records = list(finetune.run(fam, _to(fam.tiny(0), CUDA), run))
    assert len(records) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_toy_merge_and_sweep_point_on_cuda(tmp_path, capsys):
    base = save_base(tmp_path / "base.pt")
    cli.main(
        [
            "sample",
            "--family",
            "toy",
            "--ckpt",
            base,
            "--out",
            str(tmp_path / "S"),
            "--num",
            "64",
            "--batch-size",
            "32",
            "--shard-size",
            "64",
            "--synthetic.labels",
            "none",
            "--sampler.zeta",
            "1.1",
        ]
    )
    cli.main(
        [
            "finetune",
            "--family",
            "toy",
            "--ckpt",
            base,
            "--data",
            str(tmp_path / "S"),
            "--out",
            str(tmp_path / "run"),
            "--images",
            "64",
            "--batch-size",
            "32",
            "--lr",
            "1e-3",
        ]
    )
    snapshot = str(tmp_path / "run" / "snapshot-0000000064.pt")
    cli.main(["merge", "--base", base, "--self", snapshot, "--w", "0.5", "--out", str(tmp_path / "neon.pt")])
    cli.main(
        [
            "sweep",
            "--family",
            "toy",
            "--base",
            base,
            "--self",
            snapshot,
            "--w",
            "0.5",
            "--num",
            "64",
            "--batch-size",
            "32",
            "--out",
            str(tmp_path / "sweep"),
        ]
    )
    records = [json.loads(line) for line in open(tmp_path / "sweep" / "results.jsonl")]
    assert len(records) == 2 and all(r["fid"] > 0 for r in records)


def _synthetic_set(fam, tmp_path, num=16):
    model = fam.tiny(0)
    conf = synthetic.SyntheticConfig(
        out=str(tmp_path / "S"),
        num=num,
        batch_size=8,
        shard_size=num,
        labels="balanced" if model.num_classes else "none",
    )
    for _ in synthetic.write(fam, _to(model, CUDA), fam.Sampler(), conf, "sha"):
        pass
    return conf.out


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_finetune_resumed_equals_uninterrupted(fam, precision, tmp_path):
    """Two steps, then two more from the training state, give the bytes of four in one run (the same
    device, deterministic algorithms: DESIGN.md, Determinism)."""
    data = _synthetic_set(fam, tmp_path)

    def run(out, total):
        conf = finetune.FinetuneConfig(
            data=data, out=str(tmp_path / out), total_images=total, batch_size=8, lr=1e-4, precision=precision
        )
        return [r.info for r in finetune.run(fam, _to(fam.tiny(0), CUDA), conf) if r.info is not None]

    run("full", 32)
    assert len(run("resumed", 16)) == 2 and run("resumed", 32)[0]["images_seen"] == 24
    a, b = (checkpoint.read_state(str(tmp_path / out / finetune.STATE)) for out in ("full", "resumed"))
    for key in ("model", "ema", "net"):
        if key in a:
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_diagnose_gradients_on_cuda(fam):
    """`neon diagnose`'s gradient path (a CPU generator per batch, the family's loss on CUDA)."""
    model = fam.tiny(0)
    labels = _labels(model, 8)
    samples = fam.sample(model, labels, torch.arange(8), fam.Sampler())
    grads = diagnose.batch_gradients(fam, _to(model, CUDA), samples, labels, batches=2, repeats=1, seed=0)
    assert grads.shape[0] == 2 and torch.isfinite(grads).all()


def test_edm_sweep_point_with_inception_features_on_cuda(tmp_path, inception_file):
    fam = registry.get("edm")
    model = fam.tiny(0)
    base = str(tmp_path / "base.pt")
    write_checkpoint(fam, model.net.state_dict(), base, like=model)
    S, run = str(tmp_path / "S"), str(tmp_path / "run")
    cli.main(["sample", "--family", "edm", "--ckpt", base, "--out", S, "--num", "16", "--batch-size", "8"])
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
            "16",
            "--batch-size",
            "8",
            "--lr",
            "1e-4",
        ]
    )
    fid_flags = ["--inception-weights", inception_file, "--batch-size", "8"]
    ref = str(tmp_path / "ref.npz")
    cli.main(["fid-stats", "--images", S, "--out", ref, *fid_flags])
    cli.main(
        [
            "sweep",
            "--family",
            "edm",
            "--base",
            base,
            "--self",
            run,
            "--w",
            "1",
            "--num",
            "8",
            "--ref",
            ref,
            "--out",
            str(tmp_path / "sweep"),
            *fid_flags,
        ]
    )
    records = [json.loads(line) for line in open(os.path.join(tmp_path, "sweep", "results.jsonl"))]
    assert len(records) == 2 and all(r["fid"] > 0 for r in records)
