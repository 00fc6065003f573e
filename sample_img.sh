#!/usr/bin/env bash
# Sample DiT-XL/2 at 256: CKPT is this project's checkpoint or an official DiT-XL-2-256x256.pt.
# Text-conditioned checkpoints need prompts: add --prompt "..." (repeatable) or --prompt_path FILE (one per line).
set -euo pipefail
python sample.py \
    --model DiT-XL/2 \
    --image_size 256 \
    --ckpt "${CKPT:-DiT-XL-2-256x256.pt}" \
    "$@"
