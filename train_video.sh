#!/usr/bin/env bash
# Video DiT (VDiT) with torchrun (ZeRO-2) on the clips of a video CSV (DATA, default the demo clips videos/demo.csv; captions are
# encoded with --text_encoder, add --captions off for labels only); extra flags are passed through.
set -euo pipefail
NPROC=${NPROC:-2}
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "error: NPROC=$NPROC: must be a positive number of processes" >&2; exit 2; }
torchrun --standalone --nproc_per_node="$NPROC" train.py \
    --model VDiT-XL/1x2x2 \
    --use_video \
    --plugin zero2 \
    --mixed_precision bf16 \
    --batch_size 1 \
    --num_frames 16 \
    --image_size 256 \
    --frame_interval 3 \
    --num_classes 8 \
    --data_path "${DATA:-videos/demo.csv}" \
    "$@"
