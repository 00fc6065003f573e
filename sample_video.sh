#!/usr/bin/env bash
# Sample a VDiT checkpoint (CKPT: a checkpoint or experiment folder) to one mp4 per sample.
# Text-conditioned checkpoints need prompts: add --prompt "..." (repeatable) or --prompt_path FILE (one per line).
set -euo pipefail
python sample.py \
    --use_video \
    --ckpt "${CKPT:?set CKPT to a checkpoint or experiment folder}" \
    --output samples/video \
    "$@"
