"""GPU checks, run by `scripts/gpu_check.sh` (`pytest -m gpu`); skipped where CUDA is absent.

Each family's tiny model samples on CUDA close to what it samples on the CPU (the same per-sample
draws, other kernels: float tolerance only, DESIGN.md Determinism); sampling under fp16/bf16
autocast and fine-tuning with `precision` fp16/bf16 run and stay finite; a merge and a sweep point
run on CUDA through the CLI.
"""

import json

import pytest
import torch

from neon import cli, family as registry, finetune, synthetic
from tests.conftest import save_base

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
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


def test_tiny_model_samples_on_cuda_as_on_the_cpu(fam):
    model = fam.tiny(0)
    # VAR's top-k draws are discrete: compare its greedy decoding
    sampler = fam.Sampler(top_k=1) if "top_k" in fam.Sampler.__dataclass_fields__ else fam.Sampler()
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
    conf = synthetic.SyntheticConfig(out=str(tmp_path / "S"), num=16, batch_size=8, shard_size=16,
                                     labels="balanced" if model.num_classes else "none")
    for _ in synthetic.write(fam, _to(model, CUDA), fam.Sampler(), conf, "sha"):
        pass
    run = finetune.FinetuneConfig(data=conf.out, out=str(tmp_path / "run"), total_images=32, batch_size=8, lr=1e-4,
                                  precision=precision)
    records = list(finetune.run(fam, _to(fam.tiny(0), CUDA), run))
    assert len(records) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_toy_merge_and_sweep_point_on_cuda(tmp_path, capsys):
    base = save_base(tmp_path / "base.pt")
    cli.main(["sample", "--family", "toy", "--ckpt", base, "--out", str(tmp_path / "S"), "--num", "64",
              "--batch-size", "32", "--shard-size", "64", "--synthetic.labels", "none", "--sampler.zeta", "1.1"])
    cli.main(["finetune", "--family", "toy", "--ckpt", base, "--data", str(tmp_path / "S"), "--out",
              str(tmp_path / "run"), "--images", "64", "--batch-size", "32", "--lr", "1e-3"])
    snapshot = str(tmp_path / "run" / "snapshot-0000000064.pt")
    cli.main(["merge", "--base", base, "--self", snapshot, "--w", "0.5", "--out", str(tmp_path / "neon.pt")])
    cli.main(["sweep", "--family", "toy", "--base", base, "--self", snapshot, "--w", "0.5", "--num", "64",
              "--batch-size", "32", "--out", str(tmp_path / "sweep")])
    records = [json.loads(line) for line in open(tmp_path / "sweep" / "results.jsonl")]
    assert len(records) == 2 and all(r["fid"] > 0 for r in records)
