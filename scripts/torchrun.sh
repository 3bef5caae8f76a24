#!/usr/bin/env bash
# Neon on one image-family recipe with 8 GPUs: sample S, fine-tune on it, sweep w (and cfg).
# Usage: bash scripts/torchrun.sh configs/<family>/<row>.yaml   (checkpoints/ and fid_stats/ from download_models.sh)
# Every step resumes where it stopped when run again.
set -euo pipefail
recipe="$1"
torchrun --standalone --nproc_per_node=8 -m neon.cli sample --config "$recipe"
torchrun --standalone --nproc_per_node=8 -m neon.cli finetune --config "$recipe"
torchrun --standalone --nproc_per_node=8 -m neon.cli sweep --config "$recipe"
