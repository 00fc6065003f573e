"""train.py's DataLoader alone, as train.py builds it: the batches/s it can hand the loop and the loop's time in
next(), per torch.multiprocessing sharing strategy (train.py's --sharing_strategy; each in its own process, since the
strategy is global).

    python bench/loader_host.py [--workers 6] [--step_ms 9] [--strategies file_descriptor,file_system]

With the defaults it is DiT-S/2's pixel check (shapes 32x32, batch 64, 6 workers, pinned, copied to the GPU by
train.py's prepare_batch). --step_ms makes the loop sleep that long per batch (a GPU step the host waits on), so
the workers and the pin-memory thread run beside a loop that has work of its own. A second table times the
hand-over of one queued batch from a process that is idle or busy in Python.
"""

import argparse
import itertools
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from opendit.data import prepare_batch  # noqa: E402
from opendit.data.build import build_dataset  # noqa: E402
from opendit.data.seeded import EpochSeeded  # noqa: E402
from opendit.encoders import load_vae  # noqa: E402
from opendit.training.args import get_parser  # noqa: E402
from opendit.training.sampler import EpochBatches  # noqa: E402
from opendit.training.train import build_loader  # noqa: E402


def measure(args) -> tuple:
    """(batches/s, mean ms in next(), max ms in next()) over --batches after --warmup, in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flags = get_parser().parse_args(["--dataset", "shapes", "--image_size", str(args.image_size), "--num_classes", "8", "--batch_size", str(args.batch_size),
                                     "--num_workers", str(args.workers), "--vae", "none", "--sharing_strategy", args.strategy])  # build_loader sets it
    dataset = EpochSeeded(build_dataset(flags), flags.global_seed)
    loader, _ = build_loader(flags, dataset, SimpleNamespace(dp_size=1, dp_rank=0), 0, device)
    vae, epoch_batches = load_vae("none", device), EpochBatches(loader)
    stream = (batch for epoch in itertools.count() for batch in epoch_batches(epoch, 0))  # the loop's epochs, back to back
    waits = []
    for n in range(args.warmup + args.batches):
        if n == args.warmup:
            start = time.perf_counter()
        t0 = time.perf_counter()
        batch = next(stream)
        waits.append(time.perf_counter() - t0)
        prepare_batch(batch, vae, None, device, train=True)  # the copies to the GPU, as train.py makes them
        time.sleep(args.step_ms / 1000)
    seconds = time.perf_counter() - start
    timed = waits[args.warmup :]
    return args.batches / seconds, 1000 * sum(timed) / len(timed), 1000 * max(timed)


def producer(queue, n: int, spin: bool) -> None:
    """Queue n batches like a worker's (x, y), then hold this process's GIL in a Python loop (spin) or sleep."""
    for i in range(n):
        queue.put((torch.full((64, 3, 32, 32), float(i)), torch.arange(64)))
    end = time.time() + 60
    while time.time() < end:
        if not spin:
            time.sleep(1)


def receive_ms(strategy: str, spin: bool, n: int = 40) -> float:
    """ms to take one queued batch from a process that is idle or busy in Python: under file_descriptor each tensor's
    fd comes from that process's resource-sharer thread, which needs its GIL."""
    torch.multiprocessing.set_sharing_strategy(strategy)
    ctx = torch.multiprocessing.get_context("fork")
    queue = ctx.Queue()
    process = ctx.Process(target=producer, args=(queue, n, spin), daemon=True)
    process.start()
    time.sleep(0.5 + 0.05 * n)  # every batch queued; the producer now spins or sleeps
    t0 = time.perf_counter()
    for _ in range(n):
        queue.get()
    ms = 1000 * (time.perf_counter() - t0) / n
    process.kill()
    return ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", default="file_descriptor,file_system")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--batches", type=int, default=400, help="timed batches (an epoch of the shapes data is 156 at batch 64)")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--step_ms", type=float, default=0.0, help="the loop sleeps this long per batch")
    p.add_argument("--handshake_batches", type=int, default=40, help="batches of the second table (0: no second table)")
    p.add_argument("--strategy", default=None, help=argparse.SUPPRESS)  # one strategy, in a child process
    args = p.parse_args()
    if args.strategy:
        handover = [receive_ms(args.strategy, spin, args.handshake_batches) for spin in (False, True)] if args.handshake_batches else []
        print(*measure(args), *handover)
        return
    print(f"shapes {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.workers} workers, loop sleeps {args.step_ms} ms a batch; "
          f"{'CUDA: pinned, copied to the GPU' if torch.cuda.is_available() else 'CPU: not pinned'}")
    results = {}
    for strategy in args.strategies.split(","):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--strategy", strategy] + sys.argv[1:], capture_output=True, text=True)
        results[strategy] = list(map(float, out.stdout.split())) if out.returncode == 0 else (out.stderr.strip().splitlines() or ["?"])[-1][:150]
    print("| sharing strategy | batches/s | images/s | mean ms in next() | max ms in next() |")
    print("|---|---:|---:|---:|---:|")
    for strategy, r in results.items():
        print(f"| {strategy} | failed: {r} | | | |" if isinstance(r, str) else f"| {strategy} | {r[0]:.1f} | {r[0] * args.batch_size:.0f} | {r[1]:.2f} | {r[2]:.1f} |")
    if args.handshake_batches:
        print("\nOne queued batch (x 64x3x32x32 float, y 64 int64) taken from a process idle or busy in Python:")
        print("| sharing strategy | sender idle: ms per batch | sender busy: ms per batch |")
        print("|---|---:|---:|")
        for strategy, r in results.items():
            print(f"| {strategy} | failed | |" if isinstance(r, str) else f"| {strategy} | {r[3]:.2f} | {r[4]:.2f} |")


if __name__ == "__main__":
    main()
