#!/usr/bin/env bash
# The project's GPU checks on one CUDA device, in under 8 minutes: `pytest -m gpu` (each family's tiny
# model on CUDA against the CPU, fp16/bf16 autocast sampling and fine-tuning, a merge and a sweep point)
# and the sampler and FID benchmarks on CUDA. Everything is written to one summary file.
#
#   bash scripts/gpu_check.sh [SUMMARY]        (default: outputs/gpu_check/summary.txt)
#
# It needs the project installed (`make install`, then run it with .venv/bin on PATH, or any env
# with `pip install -e .[test]`). Each part is limited in time so that one hang cannot eat the budget.
set -euo pipefail
cd "$(dirname "$0")/.."
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
part "edm sampler" 60 "$python" benchmarks/edm_sampler.py --device cuda --batch 256
part "var sampler" 60 "$python" benchmarks/var_sampler.py --device cuda --batch 64
for bench in xar_sampler imm_sampler; do
  if [ -f "benchmarks/$bench.py" ]; then
    part "$bench" 60 "$python" "benchmarks/$bench.py" --device cuda
  fi
done
part "fid throughput" 90 "$python" benchmarks/fid_throughput.py --images 512 --batch-size 64
echo "summary: $summary"
