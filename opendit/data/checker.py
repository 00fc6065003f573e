"""Automatic class-fidelity checker: classifies shape images from their pixels alone; judges clips' motion too."""

import math

import torch
import torch.nn.functional as F

from .shapes import ShapesDataset, class_names

GRID, SUB = 8, 4  # shape signature: foreground mask area-averaged on a GRID x GRID lattice inside its bounding box
MAX_SIDE = 64  # larger images are area-downsampled to this before analysis
FG_LO = 0.25  # colour distance from the background below which a pixel is background
REL_LO, REL_HI = 0.3, 0.7  # distance relative to the image's strongest contrast, mapped to soft foreground [0, 1]
COLOR_TOL = 0.22  # max RGB distance (in [0, 1] units) of the mean foreground colour to a class colour
SHAPE_TOL = 0.18  # max mean abs signature difference to a class template
ASPECT_TOL = 0.3  # max |log| ratio of bounding-box aspect to the class reference
MAX_COLOR_STD = 0.1  # the foreground must be roughly one flat colour
CORE_FRAC = 0.75  # pixels with >= this fraction of the strongest contrast count as fully covered
AREA_RANGE = (0.05, 0.6)  # foreground fraction of the image
BOX_RANGE = (0.25, 0.85)  # bounding-box side relative to the image side
ALPHA_LO = 0.1  # coverage (distance / strongest contrast) below which a pixel does not count towards the centre
# Motion of a clip, judged on the shape's centre per frame (coverage-weighted, accurate to ~0.1 px on real clips).
# The data moves the centre along a straight line at constant speed by 0.12-0.25 of the image side in all.
MOTION_RANGE = (0.1, 0.3)  # allowed displacement over the clip (first to last frame of the fitted line) / image side
STEP_TOL = 0.5  # max distance of any frame's centre from the constant-speed line fitted, in per-frame steps
DIRECTION_TOL = 55.0  # max angle (degrees) between the motion and a captioned direction (the dominant one: <= 45)
UNIT = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "down": (0.0, 1.0), "up": (0.0, -1.0)}  # image coordinates


def _analyse(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image features from (N, 3, H, W) images in [-1, 1]: colour, signature, area, box, centroid, center."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    x = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    side = x.shape[-1]
    if side > MAX_SIDE:
        x = F.adaptive_avg_pool2d(x, MAX_SIDE)
    n, _, h, w = x.shape
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    bg = border.median(dim=-1).values  # (N, 3)
    dist = (x - bg[:, :, None, None]).square().sum(dim=1).sqrt()  # (N, H, W) colour distance to background
    # Soft foreground in units of the image's own strongest contrast, so every colour's anti-aliased edge counts
    # alike (an absolute threshold lets the faint halo of a bright colour widen its shape).
    contrast = dist.amax(dim=(1, 2), keepdim=True).clamp_min(FG_LO)
    m = ((dist / contrast - REL_LO) / (REL_HI - REL_LO)).clamp(0, 1) * (dist >= FG_LO)
    mass = m.sum(dim=(1, 2)).clamp_min(1e-6)

    core = (dist >= CORE_FRAC * dist.amax(dim=(1, 2), keepdim=True)).float()[:, None]  # fully covered pixels
    cn = core.sum(dim=(2, 3)).clamp_min(1.0)
    color = (x * core).sum(dim=(2, 3)) / cn  # (N, 3) mean foreground colour
    color_std = ((x - color[:, :, None, None]).square() * core).sum(dim=(2, 3)).div(cn).mean(dim=1).sqrt()

    def bounds(profile: torch.Tensor) -> torch.Tensor:
        """Sub-pixel 1% / 99% mass quantiles of a (N, L) projection, in pixel units."""
        cdf = profile.cumsum(dim=1) / profile.sum(dim=1, keepdim=True).clamp_min(1e-6)
        q = torch.tensor([0.01, 0.99]).expand(len(cdf), 2).contiguous()
        idx = torch.searchsorted(cdf, q).clamp(max=cdf.shape[1] - 1)
        hi_c = cdf.gather(1, idx)
        lo_c = torch.where(idx > 0, cdf.gather(1, (idx - 1).clamp(min=0)), torch.zeros_like(hi_c))
        frac = ((q - lo_c) / (hi_c - lo_c).clamp_min(1e-6)).clamp(0, 1)
        return idx.float() + frac  # (N, 2): positions along the axis, pixel edges at integers

    bx, by = bounds(m.sum(dim=1)), bounds(m.sum(dim=2))
    t = (torch.arange(GRID * SUB) + 0.5) / (GRID * SUB)  # SUB x SUB samples per signature cell
    gx = bx[:, :1] + t * (bx[:, 1:] - bx[:, :1])  # (N, GRID) pixel coordinates
    gy = by[:, :1] + t * (by[:, 1:] - by[:, :1])
    grid = torch.stack(torch.broadcast_tensors(2 * gx[:, None, :] / w - 1, 2 * gy[:, :, None] / h - 1), dim=-1)
    sig = F.avg_pool2d(F.grid_sample(m[:, None], grid, align_corners=False), SUB).flatten(1)  # (N, GRID*GRID)

    ys, xs = torch.arange(h) + 0.5, torch.arange(w) + 0.5
    cx = (m.sum(dim=1) * xs).sum(dim=1) / mass * side / w
    cy = (m.sum(dim=2) * ys).sum(dim=1) / mass * side / h
    box = torch.stack([(bx[:, 1] - bx[:, 0]) / w, (by[:, 1] - by[:, 0]) / h], dim=1)
    # The shape's centre from its coverage (linear in the colour distance, so anti-aliased edges weigh what they
    # cover): unlike the thresholded mask's centroid it follows sub-pixel motion closely, in original pixels.
    alpha = (dist / contrast).clamp(0, 1)
    alpha = alpha * (alpha >= ALPHA_LO)
    amass = alpha.sum(dim=(1, 2)).clamp_min(1e-6)
    center = torch.stack([(alpha.sum(dim=1) * xs).sum(dim=1) / amass * side / w,
                          (alpha.sum(dim=2) * ys).sum(dim=1) / amass * side / h], dim=1)
    return {"color": color, "color_std": color_std, "sig": sig, "area": mass / (h * w),
            "box": box, "centroid": torch.stack([cx, cy], dim=1), "center": center}


class ClassFidelityChecker:
    """Predicts shape classes from pixels: foreground colour and bounding-box shape signature, with rejection."""

    def __init__(self, num_classes: int = 8, n_per_class: int = 16, seed: int = 12345):
        self.classes = class_names(num_classes)
        self.num_classes, self.n_per_class, self.seed = num_classes, n_per_class, seed
        self.refs: dict[int, dict[str, torch.Tensor]] = {}  # analysis size -> per-class colour, signature, aspect
        colours, shapes = zip(*(name.split() for name in self.classes))
        self.colours, self.shapes = sorted(set(colours)), sorted(set(shapes))
        self.colour_id = torch.tensor([self.colours.index(c) for c in colours])
        self.shape_id = torch.tensor([self.shapes.index(s) for s in shapes])
        self.table = torch.full((len(self.colours), len(self.shapes)), -1, dtype=torch.long)  # (colour, shape) -> class
        self.table[self.colour_id, self.shape_id] = torch.arange(num_classes)

    def fit(self, dataset, n_per_class: int | None = None) -> "ClassFidelityChecker":
        """Compute per-class reference colours and shape templates from real samples of `dataset`."""
        n_per_class = n_per_class or self.n_per_class
        items = [dataset[i] for i in range(min(len(dataset), n_per_class * self.num_classes))]
        x, y = torch.stack([item["x"] for item in items]), torch.as_tensor([item["y"] for item in items])
        if len(y.unique()) < self.num_classes or y.max() >= self.num_classes:
            raise ValueError(f"fit needs samples of exactly the classes 0..{self.num_classes - 1}")
        f = _analyse(x)
        f["aspect"] = f["box"].log().diff(dim=1)[:, 0]
        self.refs[min(x.shape[-1], MAX_SIDE)] = {
            k: torch.stack([f[k][y == c].mean(0) for c in range(self.num_classes)]) for k in ("color", "sig", "aspect")}
        return self

    def _refs(self, side: int) -> dict[str, torch.Tensor]:
        """References for an analysis size, fitted deterministically from ShapesDataset when missing."""
        key = min(side, MAX_SIDE)
        if key not in self.refs:
            size = min(max(8 * round(key / 8), 16), MAX_SIDE)  # nearest size ShapesDataset supports
            n = self.n_per_class * self.num_classes
            self.fit(ShapesDataset(image_size=size, num_classes=self.num_classes, length=n, seed=self.seed))
            self.refs[key] = self.refs[min(size, MAX_SIDE)]
        return self.refs[key]

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted class per image (N,), -1 when no clear single-coloured shape matches any class."""
        return self._predict(_analyse(images), images.shape[-1])

    def _group(self, ref: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Average per-class references over the classes sharing a colour (or a shape)."""
        return torch.stack([ref[ids == j].mean(0) for j in range(int(ids.max()) + 1)])

    def _predict(self, f: dict[str, torch.Tensor], side: int) -> torch.Tensor:
        """Nearest colour and nearest shape, independently; the class is that (colour, shape) pair if it exists."""
        ref = self._refs(side)
        dc = torch.cdist(f["color"], self._group(ref["color"], self.colour_id))  # (N, colours)
        ds = (f["sig"][:, None] - self._group(ref["sig"], self.shape_id)[None]).abs().mean(-1)  # (N, shapes)
        da = (f["box"].log().diff(dim=1) - self._group(ref["aspect"], self.shape_id)[None]).abs()  # (N, shapes)
        dc_min, colour = dc.min(dim=1)
        ds_min, shape = ds.min(dim=1)
        best = self.table[colour, shape]
        ok = (best >= 0) & (dc_min <= COLOR_TOL) & (ds_min <= SHAPE_TOL)
        ok &= da.gather(1, shape[:, None])[:, 0] <= ASPECT_TOL
        ok &= (f["color_std"] <= MAX_COLOR_STD) & (f["area"] >= AREA_RANGE[0]) & (f["area"] <= AREA_RANGE[1])
        ok &= ((f["box"] >= BOX_RANGE[0]) & (f["box"] <= BOX_RANGE[1])).all(dim=1)
        return torch.where(ok, best, torch.full_like(best, -1))

    def score(self, images: torch.Tensor, labels) -> float:
        """Fraction of images whose predicted class equals their label."""
        labels = torch.as_tensor(labels).long().cpu()
        return (self.predict(images) == labels).float().mean().item() if len(labels) else 0.0

    def per_class(self, images: torch.Tensor, labels) -> dict[str, float]:
        """Accuracy per class name, for the classes present in `labels`."""
        labels = torch.as_tensor(labels).long().cpu()
        right = self.predict(images) == labels
        return {self.classes[c]: right[labels == c].float().mean().item() for c in labels.unique().tolist()}

    def score_video(self, videos: torch.Tensor, labels, directions=None) -> dict[str, float]:
        """Clip fidelity of (N, 3, T, H, W) clips in [-1, 1]: a clip counts when most of its frames are recognised as
        its class AND its shape moves as the data's do: the centres lie on a constant-speed straight line (within
        STEP_TOL per-frame steps, which rejects shuffled frames) and travel MOTION_RANGE of the image side (which
        rejects static clips); when `directions` ("left", "right", "up", "down" or None per clip) is given, the
        motion must point that way too (within DIRECTION_TOL degrees: a caption names the dominant direction). Clips of one frame are judged on the class alone.

        Returns accuracy (that clip fidelity), class_accuracy (class alone), motion_accuracy (motion alone),
        frame_accuracy, motion_fraction (kept name: the fraction of clips whose motion is right) and the mean
        displacement in pixels.
        """
        labels = torch.as_tensor(labels).long().cpu()
        if videos.ndim != 5:
            raise ValueError(f"expected videos of shape (N, 3, T, H, W), got {tuple(videos.shape)}")
        n, c, t, h, w = videos.shape
        f = _analyse(videos.movedim(2, 1).reshape(n * t, c, h, w))
        right = self._predict(f, w).view(n, t) == labels[:, None]
        class_ok = right.sum(1) * 2 > t
        motion = clip_motion(f["center"].view(n, t, 2))
        if t > 1:
            step = motion["displacement"] / (t - 1)
            motion_ok = (motion["deviation"] <= STEP_TOL * step) & (motion["displacement"] >= MOTION_RANGE[0] * w)
            motion_ok &= motion["displacement"] <= MOTION_RANGE[1] * w
            if directions is not None:
                if len(directions) != n:
                    raise ValueError(f"got {len(directions)} directions for {n} clips")
                unit = torch.tensor([UNIT[d] if d is not None else (0.0, 0.0) for d in directions])
                cos = (motion["vector"] * unit).sum(-1) / motion["displacement"].clamp_min(1e-6)
                known = torch.tensor([d is not None for d in directions])
                motion_ok &= ~known | (cos >= math.cos(math.radians(DIRECTION_TOL)))
        else:
            motion_ok = torch.ones(n, dtype=torch.bool)
        return {"accuracy": (class_ok & motion_ok).float().mean().item(), "class_accuracy": class_ok.float().mean().item(),
                "motion_accuracy": motion_ok.float().mean().item(), "frame_accuracy": right.float().mean().item(),
                "motion_fraction": motion_ok.float().mean().item(), "displacement": motion["displacement"].mean().item()}


def clip_motion(centers: torch.Tensor) -> dict[str, torch.Tensor]:
    """Least-squares constant-speed line through (N, T, 2) per-frame centres: "vector" (N, 2) the displacement
    from the first to the last frame along it, "displacement" (N,) its length and "deviation" (N,) the largest
    distance of a frame's centre from the line at that frame's time."""
    n, t, _ = centers.shape
    s = torch.linspace(0.0, 1.0, t) if t > 1 else torch.zeros(1)
    design = torch.stack([torch.ones(t), s], dim=1)  # (T, 2)
    coef = torch.linalg.pinv(design) @ centers.float()  # (N, 2, 2): start, displacement
    deviation = (centers - design @ coef).norm(dim=-1).amax(dim=1)
    return {"vector": coef[:, 1], "displacement": coef[:, 1].norm(dim=-1), "deviation": deviation}
