#!/usr/bin/env bash
# Neon on a toy recipe: sample S, fine-tune on it, sweep w. Usage: bash scripts/toy.sh configs/toy/<row>.yaml
# The toy models are tiny: one process; the image-family launchers use torchrun --nproc_per_node=8.
set -euo pipefail
recipe="$1"
neon sample --config "$recipe"
neon finetune --config "$recipe"
neon sweep --config "$recipe"
