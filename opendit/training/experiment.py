"""Experiment folders: a new {outputs}/NNN-model, the one a restarted torchrun job made, and which checkpoint to resume."""
import argparse
import json
import os
import re
import sys
from typing import Optional

import torch.distributed as dist

from opendit.checkpoint.dcp import verify_checkpoint_on_all_ranks
from opendit.checkpoint.layout import EXPORT_CONFIG, EXPORT_WEIGHTS, STEP_PATTERN, experiment_dir_of, latest_checkpoint, resolve_checkpoint_dir
from opendit.errors import CheckpointError, UsageError
from opendit.parallel.process import barrier
from opendit.training.preemption import ExperimentLock
from opendit.utils.logging import create_logger


def restarted_by_torchrun() -> bool:
    """True in the workers torchrun started again after a failure (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def new_experiment_dir(outputs: str, model: str) -> str:
    """{outputs}/{NNN}-{model with '/' -> '-'}, NNN = number of entries already there."""
    os.makedirs(outputs, exist_ok=True)
    index = len(os.listdir(outputs))
    while True:
        path = os.path.join(outputs, f"{index:03d}-{model.replace('/', '-')}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            index += 1


def run_experiment_dir(outputs: str) -> Optional[str]:
    """The experiment folder this torchrun job made before it was restarted (config.json records the run id)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    for name in sorted(os.listdir(outputs)) if run_id and os.path.isdir(outputs) else []:
        try:
            with open(os.path.join(outputs, name, "config.json")) as f:
                if json.load(f).get("run_id") == run_id:
                    return os.path.join(outputs, name)
        except (OSError, ValueError):
            continue
    return None


RUN_FILES = ("config.json", "log.txt", "metrics.jsonl")  # what a new run in the folder would replace or append to


def export_config(path: str) -> Optional[dict]:
    """The config.json of an export folder (opendit/checkpoint/export.py: model.safetensors beside the training config
    and which weights), else None; an OpenDiT model/ folder may hold a model.safetensors too."""
    try:
        with open(os.path.join(path, EXPORT_CONFIG)) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if os.path.isfile(os.path.join(path, EXPORT_WEIGHTS)) and isinstance(config, dict) and {"model", "weights"} <= set(config) else None


def check_load_path(path: str) -> None:
    """--load names something that exists and is not a file nor an export (resume needs a training checkpoint)."""
    if not os.path.exists(path):
        raise UsageError(f"--load {path}: no such file or folder")
    if os.path.isfile(path):
        raise UsageError(f"--load {path}: is a file; --load takes a checkpoint or experiment folder")
    export = export_config(path)
    if export is not None:
        source = f" ({export['source']})" if export.get("source") else ""
        raise UsageError(f"--load {path}: an export (weights only, for sample.py --ckpt), not a resumable checkpoint; pass the training checkpoint "
                         f"or experiment folder it was exported from{source}")
    folder = os.path.join(path, "checkpoints")
    if os.path.isfile(os.path.join(path, RUN_FILES[0])) and not (os.path.isdir(folder) and any(re.fullmatch(STEP_PATTERN, e) for e in os.listdir(folder))):
        raise UsageError(f"--load {path}: an experiment folder without a checkpoint (its run ended before writing one)")


def check_experiment_dir(args: argparse.Namespace, resume_dir: Optional[str]) -> None:
    """Refuse an --experiment_dir holding an earlier run that there is no checkpoint to resume from: its config.json
    and metrics.jsonl would be replaced. --load auto (the rerun command) and a torchrun restart start it again."""
    if not args.experiment_dir or resume_dir or args.load == "auto" or restarted_by_torchrun():
        return
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(args.experiment_dir, name))]
    if found:
        raise UsageError(f"--experiment_dir {args.experiment_dir}: holds an earlier run without checkpoints ({', '.join(found)}); "
                         "use another folder or remove it (--load auto restarts that run from step 0, replacing them)")


def resume_dir_for(args: argparse.Namespace) -> Optional[str]:
    """The checkpoint to resume: --load's; with --load auto, or when torchrun restarted this job after a failure,
    the newest checkpoint of the run's experiment folder (none yet: start fresh)."""
    loaded = resolve_checkpoint_dir(args.load) if args.load not in (None, "auto") else None
    if args.load == "auto" or restarted_by_torchrun():
        experiment = args.experiment_dir or (experiment_dir_of(loaded) if loaded else None) or run_experiment_dir(args.outputs)
        return (intact_latest(experiment) if experiment else None) or loaded
    if loaded is None and args.experiment_dir and latest_checkpoint(args.experiment_dir):
        raise UsageError(f"--experiment_dir {args.experiment_dir} already holds checkpoints: add --load auto to resume")
    own = experiment_dir_of(loaded) if loaded else None
    if own and args.experiment_dir and os.path.realpath(own) != os.path.realpath(args.experiment_dir):
        raise UsageError(f"--experiment_dir {args.experiment_dir}: --load {args.load} resumes in its own experiment folder {own}; "
                         "leave --experiment_dir out or give that folder")
    return loaded


def intact_latest(experiment: str) -> Optional[str]:
    """The checkpoint `latest` names; when it is damaged (or the pointer is), the newest intact one, with a warning.
    None when the folder has no checkpoints; a CheckpointError when none of them is intact."""
    folder = os.path.join(experiment, "checkpoints")
    try:
        latest = latest_checkpoint(experiment)
    except OSError:
        latest = None
    steps = sorted((e for e in os.listdir(folder) if re.fullmatch(STEP_PATTERN, e)), reverse=True) if os.path.isdir(folder) else []
    candidates = from_rank0(([latest] if latest else []) + [os.path.join(folder, e) for e in steps])  # rank 0's view
    first_error = None
    for path in candidates:
        try:
            verify_checkpoint_on_all_ranks(path)  # every rank checksums its share
        except CheckpointError as e:
            first_error = first_error or e
            continue
        if first_error is not None and (not dist.is_initialized() or dist.get_rank() == 0):
            print(f"warning: {first_error}; resuming from the newest intact checkpoint, {path}", file=sys.stderr)
        return path
    if first_error is not None:
        raise CheckpointError(f"{experiment}: no intact checkpoint (the newest: {first_error})")
    return None


def from_rank0(value):
    """Rank 0's value (a str, a list of them, or None) on every rank; the value itself on one process."""
    if dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def choose_experiment_dir(args: argparse.Namespace, resume_dir: Optional[str], is_main: bool) -> str:
    """The resumed checkpoint's experiment folder; else, chosen by rank 0: --experiment_dir, the folder of this run
    before a torchrun restart, or a new {outputs}/NNN-model."""
    if resume_dir:
        return experiment_dir_of(resume_dir)
    choice = (args.experiment_dir or (restarted_by_torchrun() and run_experiment_dir(args.outputs)) or new_experiment_dir(args.outputs, args.model)) if is_main else None
    return from_rank0(choice)


def open_experiment(args: argparse.Namespace, resume_dir: Optional[str], info) -> tuple:
    """Make (or reuse) the experiment folder and its checkpoints/ folder and lock it against a second live run;
    returns (folder, logger, lock)."""
    experiment_dir = choose_experiment_dir(args, resume_dir, info.is_main)
    lock, refusal = None, None
    if info.is_main:
        os.makedirs(os.path.join(experiment_dir, "checkpoints"), exist_ok=True)
        try:
            lock = ExperimentLock(experiment_dir)
        except UsageError as e:
            refusal = str(e)
    refusal = from_rank0(refusal)  # every rank stops together
    if refusal:
        raise UsageError(refusal)
    barrier()
    logger = create_logger(experiment_dir, info.is_main)
    logger.info(f"Experiment folder: {experiment_dir}  (world size {info.world_size}, device {info.device})")
    if args.dataset == "auto" and not os.path.exists(args.data_path):
        logger.info(f"--data_path {args.data_path} (the default) does not exist: training on the built-in shapes data")
    return experiment_dir, logger, lock or _NoLock()


class _NoLock:
    """What ranks other than 0 hold (rank 0 holds the folder's lock)."""

    def release(self) -> None:
        pass
