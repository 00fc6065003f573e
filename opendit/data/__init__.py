"""Datasets (built-in shapes, image folders, CIFAR-10, CSVs of images or clips, latent caches), the batch -> latents
step and the class-fidelity checker."""

from .batch import prepare_batch
from .build import build_dataset, text_encoder_for
from .checker import ClassFidelityChecker
from .shapes import SHAPE_CLASSES, ShapesDataset, ShapesVideoDataset, class_names, render_clip, render_shape

__all__ = [
    "SHAPE_CLASSES",
    "ClassFidelityChecker",
    "ShapesDataset",
    "ShapesVideoDataset",
    "build_dataset",
    "class_names",
    "prepare_batch",
    "render_clip",
    "render_shape",
    "text_encoder_for",
]
