"""Fault injection on tiny CPU runs: random SIGKILLs (during steps and during checkpoint saves, one process and
2-process torchrun), each resumed with --load auto and compared step by step with an uninterrupted run, and planted
bad inputs (corrupt images, a non-UTF-8 CSV, a corrupt checkpoint, a mistyped --data_path).

    python bench/faults.py --kills 4 --bad_inputs 4     # ~3-4 minutes on 2 cores
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from opendit.checkpoint.dcp import verify_checkpoint  # noqa: E402
from opendit.errors import CheckpointError  # noqa: E402

FLAGS = ["--model", "DiT-S/2", "--depth", "2", "--hidden_size", "32", "--num_heads", "2", "--image_size", "16", "--vae", "none",
         "--num_classes", "8", "--dataset", "shapes", "--dataset_size", "64", "--batch_size", "4", "--mixed_precision", "fp32",
         "--num_workers", "0", "--log_every", "1", "--device", "cpu", "--plugin", "zero2"]
STEPS, CKPT_EVERY = 16, 4
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def command(procs: int, experiment: str, *extra) -> list:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else [sys.executable]
    return [*launcher, os.path.join(ROOT, "train.py"), *FLAGS, "--max_steps", str(STEPS), "--ckpt_every", str(CKPT_EVERY), "--experiment_dir", experiment, *extra]


def losses(experiment: str) -> dict:
    with open(os.path.join(experiment, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def damaged(experiment: str) -> int:
    folder = os.path.join(experiment, "checkpoints")
    bad = 0
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.startswith("step-"):
            try:
                verify_checkpoint(os.path.join(folder, name))
            except CheckpointError:
                bad += 1
    return bad


def kill_run(procs: int, experiment: str, during_save: bool, rng: random.Random) -> None:
    """Start a run and SIGKILL its whole process group at a random step, or as soon as a save is in progress."""
    proc = subprocess.Popen(command(procs, experiment), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    target = rng.randint(2, STEPS - 2)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        checkpoints = os.path.join(experiment, "checkpoints")
        if during_save and os.path.isdir(checkpoints) and any(e.endswith(".partial") for e in os.listdir(checkpoints)):
            break
        if not during_save and os.path.isfile(os.path.join(experiment, "metrics.jsonl")) and len(open(os.path.join(experiment, "metrics.jsonl")).readlines()) >= target:
            break
        time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def bad_inputs(work: str, n: int) -> list:
    """(name, passed) for n planted bad inputs: each must end in a clean run or a one-line error, never a traceback."""
    from PIL import Image
    import numpy as np

    folder = os.path.join(work, "images", "c0")
    os.makedirs(folder)
    for i in range(8):
        Image.fromarray(np.full((16, 16, 3), i * 20, np.uint8)).save(os.path.join(folder, f"{i}.png"))
    open(os.path.join(folder, "corrupt.png"), "wb").write(b"\x89PNG garbage")
    csv = os.path.join(work, "latin1.csv")
    open(csv, "wb").write(b"".join(f"images/c0/{i}.png,caf\xe9 {i}\n".encode("latin-1") for i in range(8)))
    base = [f for f in FLAGS if f != "--plugin" and f != "zero2"]
    cases = [
        ("corrupt image skipped", ["--dataset", "folder", "--data_path", os.path.join(work, "images")], 0),
        ("non-UTF-8 CSV", ["--dataset", "csv", "--data_path", csv, "--captions", "off", "--num_classes", "0"], 0),
        ("mistyped --data_path", ["--dataset", "auto", "--data_path", os.path.join(work, "nope")], 2),
        ("random-bytes checkpoint", ["--load", os.path.join(work, "fake")], 2),
    ]
    os.makedirs(os.path.join(work, "fake"))
    for name in (".metadata", "train_state.pt", "manifest.json"):
        open(os.path.join(work, "fake", name), "wb").write(os.urandom(64))
    results = []
    for i in range(n):
        name, extra, expected = cases[i % len(cases)]
        argv = [*base, "--max_steps", "2", "--outputs", os.path.join(work, f"out{i}")]
        argv = [a for a in argv if a not in ("--dataset", "shapes")] + extra if "--dataset" in extra else argv + extra
        r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
        ok = r.returncode == expected and "Traceback" not in r.stderr
        results.append((name, ok, r.returncode, r.stderr.strip().splitlines()[-1:] if r.returncode else ""))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--bad_inputs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="faults-")
    reference = {}
    rows = []
    for i in range(args.kills):
        procs, during_save = (1, 2)[i % 2], bool((i // 2) % 2)
        if procs not in reference:
            ref = os.path.join(work, f"ref{procs}")
            subprocess.run(command(procs, ref), cwd=ROOT, env=ENV, capture_output=True, check=True, timeout=300)
            reference[procs] = losses(ref)
        experiment = os.path.join(work, f"kill{i}")
        kill_run(procs, experiment, during_save, rng)
        broken = damaged(experiment)
        resumed = subprocess.run(command(procs, experiment, "--load", "auto"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        got = losses(experiment) if resumed.returncode == 0 else {}
        lost = sum(1 for s, loss in reference[procs].items() if got.get(s) != loss)  # steps missing or not reproduced exactly
        rows.append((f"kill {i}: {procs} proc, {'during save' if during_save else 'during steps'}", resumed.returncode == 0, lost, broken))
    inputs = bad_inputs(work, args.bad_inputs)
    print(f"| run | resumed/handled | items lost (steps x batch) | checkpoints damaged |\n|---|---|---|---|")
    for name, ok, lost, broken in rows:
        print(f"| {name} | {'yes' if ok else 'NO'} | {lost * 4} | {broken} |")
    for name, ok, code, line in inputs:
        print(f"| bad input: {name} (status {code}) | {'yes' if ok else 'NO'} | - | - |")
    total_lost, total_broken = sum(r[2] for r in rows) * 4, sum(r[3] for r in rows)
    print(f"\nruns {len(rows) + len(inputs)}, kills {len(rows)}, resumes {sum(r[1] for r in rows)}, bad inputs handled {sum(r[1] for r in inputs)}/{len(inputs)}, "
          f"items lost {total_lost}, checkpoints damaged {total_broken}")


if __name__ == "__main__":
    main()
