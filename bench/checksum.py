"""The checkpoint checksums' cost on this machine: CRC-32 of a file against hashlib's digests (file_digest),
and save_checkpoint / verify_checkpoint of a real model's checkpoint (weights, AdamW moments, EMA), with the CRC-32
share of each. Needs ~1.3x the checkpoint in RAM.

    PYTHONPATH=$PWD python bench/checksum.py --model DiT-B/2 --gib 1 --dir /tmp/ckbench
"""
import argparse
import hashlib
import os
import shutil
import time

import torch

from opendit.builders import build_model
from opendit.checkpoint import dcp
from opendit.training.ema import ShardedEMA
from opendit.training.optim import ShardedAdamW


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-B/2")
    parser.add_argument("--gib", type=float, default=1.0, help="size of the plain file checksummed first")
    parser.add_argument("--dir", default="/tmp/ckbench")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    blob = os.path.join(args.dir, "blob.bin")
    with open(blob, "wb") as f:
        for _ in range(int(args.gib * 64)):
            f.write(os.urandom(16 << 20))
    size = os.path.getsize(blob)
    _, t = timed(dcp.file_crc32, blob)
    print(f"file_crc32, {size / 2**30:.2f} GiB file (page cache): {t:.2f} s, {size / t / 1e9:.2f} GB/s")
    for name in ("sha1", "sha256", "md5", "blake2b"):
        with open(blob, "rb") as f:
            _, t = timed(hashlib.file_digest, f, name)
        print(f"hashlib {name}: {size / t / 1e9:.2f} GB/s")
    os.remove(blob)

    model = build_model({"model": args.model, "input_size": 32, "num_classes": 1000})
    optimizer = ShardedAdamW(list(model.parameters()), lr=1e-4)
    model(torch.randn(1, 4, 32, 32), torch.tensor([1]), torch.tensor([1])).square().mean().backward()
    optimizer.step()  # AdamW moments exist, as in a training checkpoint
    ema = ShardedEMA(model)
    folder = os.path.join(args.dir, "checkpoints")
    os.makedirs(folder)
    crc_time = [0.0]
    real_crc32 = dcp.file_crc32

    def counted(path):
        crc, t = timed(real_crc32, path)
        crc_time[0] += t
        return crc

    dcp.file_crc32 = counted
    path, t_save = timed(dcp.save_checkpoint, folder, 1, model, optimizer, ema, {"step": 1})
    total = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    print(f"save_checkpoint {args.model}, {total / 2**30:.2f} GiB: {t_save:.2f} s, of which CRC-32 {crc_time[0]:.2f} s ({crc_time[0] / t_save:.0%})")
    crc_time[0] = 0.0
    _, t_verify = timed(dcp.verify_checkpoint, path)
    print(f"verify_checkpoint: {t_verify:.2f} s ({total / t_verify / 1e9:.2f} GB/s), CRC-32 {crc_time[0]:.2f} s; again in the same process: {timed(dcp.verify_checkpoint, path)[1] * 1e3:.1f} ms")
    shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
