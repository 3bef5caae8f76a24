#!/usr/bin/env bash
# Neon on one image-family recipe under torchrun: sample S, fine-tune on it, sweep w (and cfg).
# Usage: bash scripts/torchrun.sh configs/<family>/<row>.yaml   (checkpoints/ and fid_stats/ from download_models.sh)
# Every step resumes where it stopped when run again.
#
# One node with 8 GPUs by default. Environment overrides:
#   NPROC=N                  processes (GPUs) per node (default 8)
#   NNODES=N                 nodes (default 1, a standalone rendezvous). With N > 1 run this script once on
#                            every node, all with the same settings (scripts/slurm.sbatch does), and set:
#   RDZV_ENDPOINT=HOST:PORT  the c10d rendezvous, on one of the nodes (required when NNODES > 1)
#   RDZV_ID=ID               a name shared by the nodes of one job (default neon); each step appends its verb
#   NODE_RANK=R              optional: c10d orders the nodes itself
#   STEPS="VERB ..."         the steps to run, in order (default "sample finetune sweep"; e.g. STEPS=sweep)
# With several nodes the recipe's output folders must be on a filesystem that every node sees.
#
# Preemption (README, "Errors, limits and the output lock"): a scheduler signals every process of the job
# (SLURM's SIGTERM, or `scancel --signal=USR1` as scripts/slurm.sbatch sends ahead of the time limit).
# The workers catch SIGTERM and SIGUSR1, finish the step in progress, save what resumes it and exit
# (143, 138); torchrun forwards both to them too (SIGUSR1 only when PET_SIGNALS_TO_HANDLE names it) and
# waits PET_SHUTDOWN_TIMEOUT seconds before it kills them; this shell waits for torchrun (the trap keeps
# it alive) and then starts no further step.
set -euo pipefail
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export PET_SHUTDOWN_TIMEOUT="${PET_SHUTDOWN_TIMEOUT:-600}"
stopped=0
trap 'stopped=1' TERM USR1
recipe="${1:?usage: bash scripts/torchrun.sh RECIPE.yaml}"
nproc="${NPROC:-8}"
nnodes="${NNODES:-1}"

launch() {  # launch VERB: one torchrun of `neon VERB --config RECIPE` on this node
  if [ "$nnodes" -eq 1 ]; then
    torchrun --standalone --nproc_per_node="$nproc" -m neon.cli "$1" --config "$recipe"
  else
    : "${RDZV_ENDPOINT:?NNODES > 1 needs RDZV_ENDPOINT=HOST:PORT}"
    torchrun --nnodes="$nnodes" --nproc_per_node="$nproc" ${NODE_RANK:+--node_rank="$NODE_RANK"} \
      --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-neon}-$1" \
      -m neon.cli "$1" --config "$recipe"
  fi
}

for step in ${STEPS:-sample finetune sweep}; do
  status=0
  launch "$step" || status=$?
  if [ "$stopped" -eq 1 ]; then
    echo "neon: $step stopped by a signal; run the same command again to resume" >&2
    exit 143
  fi
  [ "$status" -eq 0 ] || exit "$status"
done
