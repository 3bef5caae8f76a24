"""The GPU checks can run (CPU tests of what `scripts/gpu_check.sh` relies on): cuBLAS's workspace
setting is in place before CUDA starts wherever deterministic algorithms are turned on, tests/gpu
compares CPU and CUDA samples only where the per-seed contract makes them equal, and the full-size
step benchmark runs (its `--tiny` mode)."""

import os
import subprocess
import sys

from neon import family as registry
from tests.conftest import REPO
from tests.families.test_devices import DRAWS_ON_DEVICE
from tests.gpu.test_cuda import compared_sampler


def test_deterministic_tests_have_the_cublas_workspace_set_before_cuda_starts():
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")
    conftest = open(os.path.join(REPO, "tests", "conftest.py")).read()
    setting = conftest.index('os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG"')
    assert setting < conftest.index("\nimport torch")
    # Imported alone (as pytest imports it first), conftest sets it and starts no CUDA.
    code = (
        "import os, tests.conftest, torch; "
        "print(os.environ['CUBLAS_WORKSPACE_CONFIG'], torch.cuda.is_initialized())"
    )
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, check=True
    )
    assert out.stdout.split() == [":4096:8", "False"]
    script = open(os.path.join(REPO, "scripts", "gpu_check.sh")).read()
    assert "export CUBLAS_WORKSPACE_CONFIG=:4096:8" in script


def test_gpu_samples_are_compared_where_the_per_seed_contract_makes_them_equal():
    assert set(DRAWS_ON_DEVICE) <= set(registry.names())
    for name in registry.names():
        fam = registry.get(name)
        expected = fam.Sampler(top_k=1) if name in DRAWS_ON_DEVICE else fam.Sampler()
        assert compared_sampler(fam) == expected


def test_full_size_step_runs_in_its_tiny_mode():
    recipes = ["edm/cifar10_cond", "VAR/d16_in256", "xAR/xar_b_in256", "imm/in256_t8"]
    command = [sys.executable, "benchmarks/full_size_step.py", "--device", "cpu", "--tiny", *recipes]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=True)
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"full-size {r}" for r in recipes]
    assert all("per-GPU batch 4" in line and "step" in line for line in lines)
