#!/usr/bin/env bash
# The measurements that need a host with 2, 4 or 8 GPUs, one section per device call (each well under 10 minutes):
#
#   bash bench/multigpu.sh SECTION [SECTION ...]     on the GPU host; tables to stdout and to $OUT/SECTION-<N>gpu.md
#   TINY=1 bash bench/multigpu.sh SECTION            the same commands with --tiny on 2 CPU processes (gloo)
#
#   tests     pytest -m gpu tests except tests/kernels (one GPU tests those; the multi-GPU cases skip below 2 GPUs)
#   latte     issue 13: DSP vs Ulysses on a Latte-XL block pair, 16-64 frames at 256 px, sp = N (and 2 when N > 2)
#   sampling  issue 15: one batch's latency per layout (1 GPU, sp N, cfg x sp, dp N) and sample_ddp.py's throughput
#   sp        issue 7: FastSeq (ring on / off) vs Ulysses per layer at 16K-64K tokens, sp = N, and the end-to-end step
#   zero      issues 7 and 16: zero2 + sharded EMA weak scaling of DiT-XL/2 (1 GPU, then N), eager and compiled
#
# N is every GPU nvidia-smi lists (NGPU=K overrides). Wheels the host lacks (diffusers, av) are installed from
# .whl/ when it is there (carry it). Results go into docs/benchmarks.md with the card, the command and the date.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/multigpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -n "${TINY:-}" ]; then
    N=2 TINY_FLAG=--tiny
else
    N=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)} TINY_FLAG=
fi
[ "$#" -gt 0 ] || { sed -n 2,13p "$0"; exit 2; }
if [ -d .whl ] && [ -z "$TINY_FLAG" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
run() {  # run NPROC SCRIPT ARGS...: torchrun on NPROC processes; the tables printed, everything in $OUT/multigpu.log
    local nproc=$1; shift
    echo "\$ torchrun --standalone --nproc_per_node $nproc $* $TINY_FLAG"
    $PY -m torch.distributed.run --standalone --nproc_per_node "$nproc" "$@" $TINY_FLAG 2>&1 | tee -a "$OUT/multigpu.log" \
        | grep -E '^\||^[A-Za-z]' | grep -v -E '^[WI][0-9]{4} |[Ww]arning'
}
for section in "$@"; do
    f="$OUT/$section-${N}gpu.md"
    {
        echo "## $section on $N x ${CARD:-CPU process}, $(date -u +%F)"
        case $section in
            tests) $PY -m pytest -q -m gpu tests --ignore=tests/kernels -rs 2>&1 | tail -15 ;;  # kernels: one GPU is enough
            latte) run "$N" bench/sequence_parallel.py --model latte --frames 16,32,64
                   [ "$N" -gt 2 ] && run 2 bench/sequence_parallel.py --model latte --frames 16,32,64 ;;
            sampling) if [ -n "$TINY_FLAG" ]; then run "$N" bench/sample_parallel.py --steps 5 --images 4 --ddp_batch 2 --ddp_steps 5
                      else run "$N" bench/sample_parallel.py --ddp_batch 64; fi ;;
            sp) run "$N" bench/sequence_parallel.py --tokens 16384,32768,65536 --iters 8 ;;
            zero) run 1 bench/zero_memory.py --steps 30 --variants zero2:bf16
                  run "$N" bench/zero_memory.py --steps 30 --variants zero2:bf16,zero2:bf16,ddp:bf16
                  run "$N" bench/zero_memory.py --steps 30 --batch_size 64 --variants zero2:bf16
                  run "$N" bench/zero_memory.py --steps 30 --compile --variants zero2:bf16 ;;
            *) echo "unknown section: $section (tests, latte, sampling, sp, zero)"; exit 2 ;;
        esac
    } 2>&1 | tee "$f"
done
