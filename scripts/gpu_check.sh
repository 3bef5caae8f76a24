#!/usr/bin/env bash
# The project's GPU checks on one CUDA device, in at most 10 minutes (each part has a time limit; their
# sum is 600 s): `pytest -m gpu` (each family's tiny model on CUDA against the CPU, fp16/bf16 autocast
# sampling, fp32/bf16/fp16 fine-tunes resumed against uninterrupted ones, `neon diagnose`'s gradients,
# a merge, the toy's sweep point and EDM's with Inception features), one fine-tune step of each paper
# recipe's full-size network at its per-GPU batch with its peak memory (benchmarks/full_size_step.py),
# the sampler and FID benchmarks on CUDA, and with 2+ GPUs a 2-process nccl run of the toy's sample,
# fine-tune and sweep. Everything is written to one summary file.
#
#   bash scripts/gpu_check.sh [SUMMARY]        (default: outputs/gpu_check/summary.txt)
#
# It needs the project installed (`make install`, then run it with .venv/bin on PATH, or any env
# with `pip install -e .[test]`). Each part is limited in time so that one hang cannot eat the budget.
set -euo pipefail
cd "$(dirname "$0")/.."
# tests/conftest.py turns on torch.use_deterministic_algorithms for every test; cuBLAS then raises at its
# first matmul unless this is set before CUDA starts (conftest sets it too; the benchmarks need it not).
export CUBLAS_WORKSPACE_CONFIG=:4096:8
summary=${1:-outputs/gpu_check/summary.txt}
mkdir -p "$(dirname "$summary")"
python=${PYTHON:-python}
[ -x .venv/bin/python ] && python=${PYTHON:-.venv/bin/python}

part() {  # part NAME SECONDS CMD...: run CMD with a time limit, append its output and status to the summary
  local name=$1 limit=$2 status=0
  shift 2
  echo "== $name: $*" | tee -a "$summary"
  timeout "$limit" "$@" >> "$summary" 2>&1 || status=$?
  echo "== $name: exit $status" | tee -a "$summary"
}

: > "$summary"
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} >> "$summary" 2>&1

part "pytest -m gpu" 240 "$python" -m pytest -q -m gpu -p no:cacheprovider -rs
part "full-size step" 120 "$python" benchmarks/full_size_step.py --device cuda
part "edm sampler" 30 "$python" benchmarks/edm_sampler.py --device cuda --batch 256
part "var sampler" 30 "$python" benchmarks/var_sampler.py --device cuda --batch 64
for bench in xar_sampler imm_sampler; do
  part "$bench" 30 "$python" "benchmarks/$bench.py" --device cuda
done
part "fid throughput" 60 "$python" benchmarks/fid_throughput.py --images 512 --batch-size 64

gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || echo 0)
if [ "$gpus" -ge 2 ]; then
  nccl=$(mktemp -d)
  "$python" -c "import sys; from tests.conftest import save_base; save_base(sys.argv[1])" "$nccl/base.pt"
  run2=("$python" -m torch.distributed.run --standalone --nproc_per_node=2 -m neon.cli)
  part "nccl sample" 20 "${run2[@]}" sample --family toy --ckpt "$nccl/base.pt" --out "$nccl/S" --num 64 \
    --batch-size 16 --shard-size 32 --synthetic.labels none
  part "nccl finetune" 20 "${run2[@]}" finetune --family toy --ckpt "$nccl/base.pt" --data "$nccl/S" \
    --out "$nccl/run" --images 64 --batch-size 32 --lr 1e-3
  part "nccl sweep point" 20 "${run2[@]}" sweep --family toy --base "$nccl/base.pt" --self "$nccl/run" \
    --w 0.5 --num 64 --batch-size 16 --out "$nccl/sweep"
else
  echo "== nccl: skipped ($gpus GPU; the 2-process run needs 2)" | tee -a "$summary"
fi
echo "summary: $summary"
