#!/usr/bin/env bash
# Class-conditional image DiT with torchrun (ZeRO-2: FSDP2, sharded optimizer and EMA). NPROC GPUs/processes; extra flags are passed through.
# Without --data_path the built-in shapes data is used; --data_path takes a class folder, CIFAR-10, a CSV or a latent cache (README, Data).
set -euo pipefail
NPROC=${NPROC:-2}
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "error: NPROC=$NPROC: must be a positive number of processes" >&2; exit 2; }
torchrun --standalone --nproc_per_node="$NPROC" train.py \
    --model DiT-XL/2 \
    --plugin zero2 \
    --mixed_precision bf16 \
    --batch_size 2 \
    --num_classes 10 \
    "$@"
