"""--check_fidelity: score samples with the built-in shapes checker, which reads the pixels only."""
import json
import os
from typing import Optional

import torch

from opendit.errors import UsageError


def check_shapes_labels(labels: list) -> None:
    """--check_fidelity scores shapes classes only: refuse other labels before anything is sampled."""
    from opendit.data.shapes import SHAPE_CLASSES

    bad = sorted({label for label in labels if not 0 <= label < len(SHAPE_CLASSES)})
    if bad:
        raise UsageError(f"--check_fidelity: label {', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''} is not a shapes class "
                         f"(0..{len(SHAPE_CLASSES) - 1}); pass --labels among them")


def check_fidelity(samples: torch.Tensor, labels: list, use_video: bool, output: str, directions: Optional[list] = None) -> dict:
    """Score samples with the shapes checker (it reads the pixels only) and write fidelity.json. Video clips whose
    prompt names a direction ("a red circle moving left") must move that way too."""
    from opendit.data.checker import ClassFidelityChecker
    from opendit.data.shapes import SHAPE_CLASSES

    check_shapes_labels(labels)
    checker = ClassFidelityChecker(num_classes=len(SHAPE_CLASSES))
    y = torch.tensor(labels)
    if use_video:
        extra = checker.score_video(samples, y, directions if directions and any(directions) else None)  # accuracy, class and motion alone
        score = extra["accuracy"]
    else:
        score = checker.score(samples, y)
        extra = {"per_class": checker.per_class(samples, y)}
    right = round(score * len(labels))
    print(f"class fidelity: {100 * score:.1f}% ({right}/{len(labels)} samples recognised as their class)")
    result = {"fidelity": score, **extra}
    with open(os.path.join(output, "fidelity.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    return result
