#!/usr/bin/env bash
# Sample a DiT checkpoint: CKPT is this project's checkpoint (its model and image size come from it) or an official
# Meta DiT file (default DiT-XL-2-256x256.pt: DiT-XL/2 at 256; for DiT-XL-2-512x512.pt add --image_size 512).
# Text-conditioned checkpoints need prompts: add --prompt "..." (repeatable) or --prompt_path FILE (one per line).
set -euo pipefail
python sample.py \
    --ckpt "${CKPT:-DiT-XL-2-256x256.pt}" \
    "$@"
