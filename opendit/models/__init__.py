"""Model registry: DiT-{S,B,L,XL}/{2,4,8} for images and VDiT-{S,B,L,XL}/{1x2x2,2x2x2} for video."""
from opendit.models.dit import DiT, DiT_image_models
from opendit.models.vdit import VDiT, VDiT_models

DiT_models = {**DiT_image_models, **VDiT_models}


def is_video_model(name: str) -> bool:
    """True for the video (VDiT) models of the registry."""
    return name in VDiT_models


__all__ = ["DiT", "VDiT", "DiT_models", "DiT_image_models", "VDiT_models", "is_video_model"]
