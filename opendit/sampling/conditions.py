"""What each sample is conditioned on: class labels (--labels), prompts (--prompt, --prompt_path), and file names."""
import argparse
import re
from typing import Optional

from opendit.errors import UsageError


def default_labels(num_classes: int) -> list:
    """Classes sampled when none are given: DiT's eight ImageNet classes, or the first ten."""
    if num_classes == 1000:
        return [207, 360, 387, 974, 88, 979, 417, 279]
    return list(range(min(num_classes, 10)))


def parse_labels(text: Optional[str], num_classes: int) -> list:
    """--labels '1,2,3' or 'all' -> a list of ints, each checked against num_classes."""
    if text is None:
        return default_labels(num_classes)
    if text == "all":
        return list(range(num_classes))
    try:
        labels = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--labels {text}: expected comma-separated integers or 'all'") from None
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad or not labels:
        raise UsageError(f"--labels {text}: each label must lie in [0, {num_classes})")
    return labels



def read_prompts(args: argparse.Namespace) -> list:
    """--prompt (repeatable) followed by the non-blank lines of --prompt_path."""
    prompts = list(args.prompt or [])
    if args.prompt_path:
        try:
            with open(args.prompt_path, encoding="utf-8") as f:
                prompts += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise UsageError(f"--prompt_path {args.prompt_path}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompt_path {args.prompt_path}: not UTF-8 text (byte {e.start}); save the prompts as UTF-8") from None
    return prompts


def slug(prompt: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt: "A red circle!" -> "a-red-circle"."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].strip("-") or "empty"


def conditions(args: argparse.Namespace, prompts: list, has_labels: bool) -> tuple:
    """Per sample: its class label (None: the model has no label table) and its prompt index (None: a class model).

    A class model samples each label; a text model samples each prompt, under each --labels class when given
    (else under the null class, when it has a label table). Each condition is repeated --per_class times.
    """
    if not prompts:
        pairs = [(label, None) for label in parse_labels(args.labels, args.num_classes)]
    else:
        labels = parse_labels(args.labels, args.num_classes) if args.labels is not None else [args.num_classes if has_labels else None]
        pairs = [(label, j) for j in range(len(prompts)) for label in labels]
    pairs = [pair for pair in pairs for _ in range(args.per_class)]
    return [label for label, _ in pairs], [j for _, j in pairs]


def file_stem(i: int, label: Optional[int], j: Optional[int], prompts: list, name_class: bool) -> str:
    """0003-class5 (class models), 0003-prompt1-a-red-circle (text models), 0003-prompt1-class5-a-red-circle."""
    parts = [f"{i:04d}"] + ([f"prompt{j}"] if j is not None else []) + ([f"class{label}"] if name_class else [])
    return "-".join(parts + ([slug(prompts[j])] if j is not None else []))


def prompt_classes(prompts: list) -> list:
    """For --check_fidelity on a text model: the shapes class each prompt names ("a red circle" -> "red circle")."""
    from opendit.data.shapes import SHAPE_CLASSES

    found = []
    for prompt in prompts:
        hits = [k for k, name in enumerate(SHAPE_CLASSES) if name in prompt.lower()]
        if len(hits) != 1:
            raise UsageError(f"--check_fidelity: prompt {prompt!r} names {len(hits)} shapes classes (need exactly one of {', '.join(SHAPE_CLASSES)}); or pass --labels")
        found.append(hits[0])
    return found


def prompt_directions(prompts: list) -> list:
    """For --check_fidelity on a text video model: the direction each prompt names ("... moving left" -> "left"), or None."""
    found = []
    for prompt in prompts:
        hits = re.findall(r"\bmoving (left|right|up|down)\b", prompt.lower())
        found.append(hits[0] if len(hits) == 1 else None)
    return found
