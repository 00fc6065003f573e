"""Model registry: DiT-{S,B,L,XL}/{2,4,8} for images; VDiT-{S,B,L,XL}/{1x2x2,2x2x2}, Latte-{S,B,L,XL}/{1x2x2,2x2x2}
and the seed's vDiT-{S,B,L,XL}/222 (also spelt VDiT-*/222) for video."""
from opendit.models.dit import DiT, DiT_image_models
from opendit.models.latte import Latte, Latte_models
from opendit.models.vdit import VDiT, VDiT_models
from opendit.models.vdit3d import VDiT3D, VDiT3D_models

Video_models = {**VDiT_models, **Latte_models, **VDiT3D_models}
DiT_models = {**DiT_image_models, **Video_models}


def is_video_model(name: str) -> bool:
    """True for the video (VDiT, Latte, vDiT) models of the registry."""
    return name in Video_models


def spatial_patch(name: str) -> int:
    """The spatial patch size of a registry model: DiT-XL/2 -> 2, VDiT-XL/1x2x2 -> 2, vDiT-XL/222 -> 2."""
    if name not in DiT_models:
        raise KeyError(f"unknown model {name!r}")
    tail = name.split("/")[-1]  # "2", "1x2x2" or "222" (one digit per axis t, h, w)
    return int(tail.split("x")[-1]) if "x" in tail or not is_video_model(name) else int(tail[-1])


__all__ = [
    "DiT",
    "VDiT",
    "VDiT3D",
    "Latte",
    "DiT_models",
    "DiT_image_models",
    "VDiT_models",
    "VDiT3D_models",
    "Latte_models",
    "Video_models",
    "is_video_model",
    "spatial_patch",
]
