"""Built-in procedural datasets and the automatic class-fidelity checker."""

from .checker import ClassFidelityChecker
from .shapes import SHAPE_CLASSES, ShapesDataset, ShapesVideoDataset, class_names, render_clip, render_shape

__all__ = [
    "SHAPE_CLASSES",
    "ClassFidelityChecker",
    "ShapesDataset",
    "ShapesVideoDataset",
    "class_names",
    "render_clip",
    "render_shape",
]
