#!/usr/bin/env bash
# Video DiT (VDiT) with torchrun (DDP) on the built-in moving-shapes clips; extra flags are passed through.
set -euo pipefail
NPROC=${NPROC:-2}
torchrun --standalone --nproc_per_node="$NPROC" train.py \
    --model VDiT-XL/1x2x2 \
    --use_video \
    --plugin ddp \
    --mixed_precision bf16 \
    --batch_size 1 \
    --num_frames 16 \
    --image_size 256 \
    --frame_interval 3 \
    --num_classes 8 \
    "$@"
