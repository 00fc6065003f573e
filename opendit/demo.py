"""`make demo`: train a small DiT on the built-in shapes on the CPU, sample every class and score the samples.

The score comes from opendit.data.checker, which classifies each generated image from its pixels (colour and
shape) without seeing its label. `--video` does the same with a tiny VDiT and writes mp4 files.
"""
import argparse
import os
import re
import shutil
import sys
import time

from opendit.sampling import sample as sample_cli
from opendit.training import train as train_cli

# Small enough for two CPU cores, large enough to draw the eight shapes classes cleanly.
# The cosine noise schedule matters at 16x16: with the linear one (tuned for 256x256 latents) the last third of
# the steps is nearly pure noise, and the same budget reached 60-80% class fidelity instead of 97.5%.
COMMON = dict(depth=4, hidden_size=128, num_heads=4, image_size=16, lr=4e-3, noise_schedule="squaredcos_cap_v2", ema_decay=0.995)
IMAGE_FLAGS = dict(COMMON, model="DiT-S/2", batch_size=32, max_steps=2000)
# Video: 2x2x2 patches (two temporal tokens for four frames) at batch 32, with Min-SNR-5 loss weighting. A recipe
# search on a GPU (bench/demo_recipes.py, docs/benchmarks.md) scored 25% at 2000 steps and 94% at 6000 without the
# weighting; with it, 3000 steps score 94% on 2 CPU cores in under 10 minutes.
VIDEO_FLAGS = dict(COMMON, model="VDiT-S/2x2x2", num_frames=4, batch_size=32, max_steps=3000, snr_gamma=5)


def as_argv(flags: dict) -> list:
    """{"lr": 4e-3, "compile": True} -> ["--lr", "0.004", "--compile"]: True stands for a switch (False: left out)."""
    argv = []
    for key, value in flags.items():
        if str(value).lower() in ("true", "false"):
            argv += [f"--{key}"] if str(value).lower() == "true" else []
        else:
            argv += [f"--{key}", str(value)]
    return argv


# What a demo run leaves in its --outputs folder; any other entry means the folder is someone else's.
DEMO_ENTRY = re.compile(r"^(\d{3}-V?DiT-S-2(x2x2)?|text_encoder|\.demo)$")


def clear_demo_folder(outputs: str) -> None:
    """Remove an earlier demo run from `outputs`; refuse a folder holding anything the demo does not write."""
    if os.path.isfile(outputs):
        sys.exit(f"error: --outputs {outputs} is a file; give a folder for the demo run")
    foreign = sorted(e for e in os.listdir(outputs) if not DEMO_ENTRY.match(e)) if os.path.isdir(outputs) else []
    if foreign:
        sys.exit(f"error: --outputs {outputs} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which the demo "
                 "did not write; it replaces its folder, so choose another --outputs")
    shutil.rmtree(outputs, ignore_errors=True)
    os.makedirs(outputs)
    open(os.path.join(outputs, ".demo"), "w").close()


def parse_set(items: list) -> dict:
    """--set FLAG=VALUE items -> {flag: value}, each checked against train.py's flags; one line on a mistake."""
    actions = {a.dest: a for a in train_cli.get_parser()._actions}
    flags = {}
    for item in items:
        key, _, value = item.partition("=")
        key = key.lstrip("-")
        if key not in actions or not value:
            sys.exit(f"error: --set {item}: expected FLAG=VALUE with one of train.py's flags (python train.py --help)")
        action = actions[key]
        try:
            converted = action.type(value) if action.type else value
        except ValueError:
            sys.exit(f"error: --set {item}: {value!r} is not a valid {action.type.__name__} for --{key}")
        if action.choices and converted not in action.choices:
            sys.exit(f"error: --set {item}: choose one of {', '.join(map(str, action.choices))}")
        flags[key] = value
    return flags


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--video", action="store_true", help="the video demo (VDiT, mp4 output)")
    parser.add_argument("--outputs", default="outputs/demo", help="folder for the run (an earlier demo run there is replaced)")
    parser.add_argument("--max_steps", type=int, default=None, help="override the number of training steps")
    parser.add_argument("--per_class", type=int, default=None, help="samples per class (default 10 images / 4 videos)")
    parser.add_argument("--sampling_steps", type=int, default=100, help="DDPM sampling steps")
    parser.add_argument("--min_fidelity", type=float, default=None, help="exit with an error below this score (default 0.9 for images, none for video)")
    parser.add_argument("--text", action="store_true", help="condition on captions (\"a red circle moving left\") through a tiny CLIP text encoder built offline; samples every class x direction")
    parser.add_argument("--set", action="append", default=[], metavar="FLAG=VALUE", help="override one of train.py's demo flags (repeatable), e.g. --set lr=2e-3")
    args = parser.parse_args(argv)

    flags = dict(VIDEO_FLAGS if args.video else IMAGE_FLAGS)
    if args.max_steps:
        flags["max_steps"] = args.max_steps
    overrides = parse_set(args.set)
    clear_demo_folder(args.outputs)
    experiment = os.path.join(args.outputs, "000-" + flags["model"].replace("/", "-"))
    train_flags = dict(flags, dataset="shapes", vae="none", num_classes=8, mixed_precision="fp32", num_workers=1, log_every=100, ckpt_every=0,
                       experiment_dir=experiment)
    if args.text:
        from opendit.encoders import tiny_text_encoder

        train_flags.update(captions="on", text_encoder=tiny_text_encoder(os.path.join(args.outputs, "text_encoder"), hidden_size=64))
    train_flags.update(overrides)
    start = time.time()
    train_argv = as_argv(train_flags) + (["--use_video"] if args.video else [])
    train_cli.main(train_argv)
    trained = time.time()

    per_class = args.per_class or (4 if args.video else 10)
    sample_argv = ["--ckpt", experiment, "--sampler", "ddpm", "--num_sampling_steps", str(args.sampling_steps), "--cfg_scale", "4.0",
                   "--output", os.path.join(experiment, "samples"), "--check_fidelity"]
    if args.text:  # every class, moving each way (video) or as is (images)
        from opendit.data.shapes import SHAPE_CLASSES

        ways = [" moving left", " moving right", " moving up", " moving down"] if args.video else [""]
        prompts = [f"a {name}{way}" for name in SHAPE_CLASSES for way in ways]
        sample_argv += [arg for prompt in prompts for arg in ("--prompt", prompt)] + ["--per_class", str(max(1, per_class // len(ways)))]
    else:
        sample_argv += ["--labels", "all", "--per_class", str(per_class)]
    result = sample_cli.main(sample_argv)
    sampled = time.time()
    samples = os.path.join(experiment, "samples")
    if args.video:
        from opendit.utils.media import read_video, save_contact_sheet

        sheet = save_contact_sheet([read_video(f) for f in result["files"]], os.path.join(samples, "contact_sheet.png"))
        print(f"demo: a clip counts when most frames show its class and its shape moves as the data's do; "
              f"class alone {100 * result['class_accuracy']:.1f}%, motion alone {100 * result['motion_accuracy']:.1f}%, "
              f"mean displacement {result['displacement']:.1f} px; frames of each clip in {sheet}")
    print(f"demo: trained in {trained - start:.0f} s, sampled in {sampled - trained:.0f} s; samples in {samples}")
    min_fidelity = args.min_fidelity if args.min_fidelity is not None else (0.0 if args.video else 0.9)
    if result["fidelity"] < min_fidelity:
        print(f"demo: class fidelity {100 * result['fidelity']:.1f}% is below {100 * min_fidelity:.0f}%", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
