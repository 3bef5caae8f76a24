# make demo: Neon on the 2-D toy models (quick: DEMO_FLAGS=--quick).  make test: the linter and the test suite.
# make test-portability: the kernel-sensitive tests (-m numerics) again under another kernel choice.
# All create .venv in the repo root when missing and install the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_FLAGS ?=

.PHONY: demo test test-portability install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/neon demo $(DEMO_FLAGS)

# Two pytest workers of one intra-op thread each: on 2 cores this is the fastest split (two threads per
# worker would wait on each other). Tests do not depend on the order or the worker they run in.
PYTEST_WORKERS ?= 2

# The linter first (pyproject.toml's [tool.ruff]: lines of at most 110 characters, pyflakes, sorted
# imports): a few seconds, and the suite only runs on a clean tree.
test: $(STAMP)
	$(BIN)/python -m ruff check --no-cache .
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS)

# Another CPU's kernels, simulated: GEMM and convolution kernels one level below this CPU's (MKL's
# code path, oneDNN's ISA; on AVX-512 CPUs ATen's vector kernels drop to AVX2 too) and one thread per
# process. A test that holds only on this machine's kernels fails here too (README, "Determinism").
# ATen's scalar kernels are not used on AVX2 CPUs: they change torch.randn itself, which fills the
# golden cases' weights, and no x86-64 CPU PyTorch supports today lacks AVX2.
test-portability: $(STAMP)
	cap=$$($(BIN)/python -c "import torch; print(torch.backends.cpu.get_cpu_capability())"); \
	case "$$cap" in AVX512*) aten=avx2; mkl=AVX2; dnn=AVX2;; *) aten=avx2; mkl=COMPATIBLE; dnn=AVX;; esac; \
	echo "portability pass: native $$cap -> ATEN_CPU_CAPABILITY=$$aten MKL_CBWR=$$mkl ONEDNN_MAX_CPU_ISA=$$dnn OMP_NUM_THREADS=1"; \
	ATEN_CPU_CAPABILITY=$$aten MKL_CBWR=$$mkl ONEDNN_MAX_CPU_ISA=$$dnn OMP_NUM_THREADS=1 \
		$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m numerics -p no:cacheprovider
