"""Run several `python -m opendit.demo` recipes side by side and print their scores (a recipe search).

    python bench/demo_recipes.py --video --parallel 6 \
        --recipe base: \
        --recipe 2x2x2:model=VDiT-S/2x2x2,batch_size=32,max_steps=2000

Each recipe is NAME:FLAG=VALUE,... (train.py flags the demo passes, as `--set`); `text` as a flag name runs the
demo's `--text` mode. Results come from each run's samples/fidelity.json; logs go to {outputs}/{NAME}.log.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time


def command(args: argparse.Namespace, name: str, spec: str) -> list:
    cmd = [sys.executable, "-m", "opendit.demo", "--outputs", os.path.join(args.outputs, name), "--min_fidelity", "0"]
    cmd += ["--video"] if args.video else []
    for item in filter(None, spec.split(",")):
        cmd += ["--text"] if item == "text" else ["--set", item]
    return cmd + args.extra


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", action="append", required=True, help="NAME:FLAG=VALUE,...")
    p.add_argument("--video", action="store_true")
    p.add_argument("--parallel", type=int, default=1, help="recipes run at once")
    p.add_argument("--outputs", default="outputs/recipes")
    p.add_argument("extra", nargs="*", help="more demo flags for every recipe (after --)")
    args = p.parse_args()
    os.makedirs(args.outputs, exist_ok=True)
    pending = [tuple(r.split(":", 1)) for r in args.recipe]
    running, done = {}, {}
    while pending or running:
        while pending and len(running) < args.parallel:
            name, spec = pending.pop(0)
            log = open(os.path.join(args.outputs, f"{name}.log"), "w")
            running[name] = (subprocess.Popen(command(args, name, spec), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "2"}), time.time(), spec)
        for name, (proc, start, spec) in list(running.items()):
            if proc.poll() is not None:
                done[name] = (proc.returncode, time.time() - start, spec)
                del running[name]
        time.sleep(1)
    print("| recipe | flags | status | seconds | clip fidelity | class alone | motion alone | mean displacement px |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, spec in (tuple(r.split(":", 1)) for r in args.recipe):
        code, seconds, _ = done[name]
        found = glob.glob(os.path.join(args.outputs, name, "*", "samples", "fidelity.json"))
        r = json.load(open(found[0])) if found else {}
        cells = [f"{100 * r[k]:.1f}%" if k in r else "-" for k in ("fidelity", "class_accuracy", "motion_accuracy")]
        disp = f"{r['displacement']:.2f}" if "displacement" in r else "-"
        print(f"| {name} | {spec or '(demo default)'} | {code} | {seconds:.0f} | {' | '.join(cells)} | {disp} |")


if __name__ == "__main__":
    main()
