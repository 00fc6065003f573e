"""Watch it learn (--sample_every N): samples from the EMA weights, fixed noise and fixed conditions, written to
{experiment}/samples/step-NNNNNNN/ (grid.png for images; contact_sheet.png and one mp4 per clip for video) and to
TensorBoard, on rank 0, leaving every RNG of training as it was (resume stays exact)."""
import argparse
import os
from typing import Optional

import torch
from torch.distributed.tensor import DTensor

from opendit.builders import build_model
from opendit.checkpoint.layout import rng_state, set_rng_state
from opendit.sampling.denoise import denoise
from opendit.utils.media import make_grid, save_image_grid, save_video

PREVIEW_SEED = 0
PREVIEW_STEPS = 25  # DDIM steps
PREVIEW_CFG = 4.0
IMAGES, CLIPS = 8, 4


def contact_sheet(videos: torch.Tensor, path: str) -> str:
    """(N, C, T, H, W) clips in [-1, 1] -> one PNG, a row per clip with its frames side by side; returns the path."""
    n, c, t, h, w = videos.shape
    frames = videos.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)  # clip-major: row i = clip i
    return save_image_grid(frames, path, nrow=t)


def full_weights(ema_state: dict) -> dict:
    """The EMA's full tensors: DTensor shards are gathered (a collective: every rank must call this)."""
    return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach() for name, t in ema_state.items()}


class Preview:
    """Fixed noise and conditions, drawn once; __call__(step) samples them from the EMA and writes the files."""

    def __init__(self, args: argparse.Namespace, config: dict, dataset, vae, text_encoder, device: torch.device, experiment_dir: str, is_main: bool, tb=None):
        self.config, self.vae, self.device, self.is_main, self.tb = config, vae, device, is_main, tb
        self.folder = os.path.join(experiment_dir, "samples")
        self.video = bool(args.use_video)
        n = CLIPS if self.video else IMAGES
        saved = rng_state()
        try:  # reading items and drawing noise must not move training's RNGs
            generator = torch.Generator().manual_seed(PREVIEW_SEED)
            size = config["input_size"]
            shape = (n, config["in_channels"], args.num_frames, size, size) if self.video else (n, config["in_channels"], size, size)
            self.noise = torch.randn(shape, generator=generator)
            num_classes = config.get("num_classes", 0)
            self.y = torch.arange(n) % num_classes if num_classes else None
            self.text = self.null_text = None
            if config.get("text_dim"):
                self.text, self.null_text = self._prompt_embeddings(dataset, text_encoder, n)
        finally:
            set_rng_state(saved)
        self.sampling = argparse.Namespace(cfg_scale=PREVIEW_CFG, num_classes=num_classes, cfg_channels="3", sampler="ddim", num_sampling_steps=PREVIEW_STEPS,
                                           noise_schedule=args.noise_schedule, vae=args.vae)  # fmt: skip
        self.fps = getattr(args, "fps", 8)

    def _prompt_embeddings(self, dataset, text_encoder, n: int) -> tuple:
        """Pooled captions of the first n items (a latent cache's stored embeddings), and the null prompt's."""
        items = [dataset[i % len(dataset)] for i in range(n)]
        if "text_emb" in items[0]:
            text = torch.stack([torch.as_tensor(item["text_emb"]).float() for item in items])
        else:
            text = text_encoder.encode([item["text"] for item in items]).float().cpu()
        return text, text_encoder.null_embedding().float().cpu()

    @torch.no_grad()
    def __call__(self, step: int, ema_state: dict) -> Optional[str]:
        """Sample at this step (all ranks call it: sharded EMA weights are gathered); rank 0 writes. -> the folder or None."""
        weights = full_weights(ema_state)
        if not self.is_main:
            return None
        saved = rng_state()
        try:
            return self._sample(step, weights)
        finally:
            set_rng_state(saved)

    def _sample(self, step: int, weights: dict) -> str:
        model = build_model(self.config).to(self.device)
        model.load_state_dict({k: v.to(self.device) for k, v in weights.items()}, strict=True)
        model.eval()  # no label dropout
        torch.manual_seed(PREVIEW_SEED)  # the samplers' own draws (zero for DDIM's eta = 0) are fixed too
        to = dict(device=self.device)
        y = self.y.to(**to) if self.y is not None else None
        text = self.text.to(**to) if self.text is not None else None
        null_text = self.null_text.to(**to) if self.null_text is not None else None
        latents = denoise(self.sampling, model, self.noise.to(**to), y, text, null_text, progress=False)  # no bars between log lines
        pixels = self.vae.decode(latents).clamp(-1, 1).float().cpu()
        folder = os.path.join(self.folder, f"step-{step:07d}")
        os.makedirs(folder, exist_ok=True)
        if self.video:
            sheet = contact_sheet(pixels, os.path.join(folder, "contact_sheet.png"))
            for i, clip in enumerate(pixels):
                save_video(clip, os.path.join(folder, f"{i:02d}.mp4"), fps=self.fps)
            image = make_grid(pixels.permute(0, 2, 1, 3, 4).flatten(0, 1), nrow=pixels.shape[2])
        else:
            sheet = save_image_grid(pixels, os.path.join(folder, "grid.png"), nrow=4)
            image = make_grid(pixels, nrow=4)
        if self.tb is not None:
            self.tb.add_image("samples", image, step, dataformats="HWC")  # make_grid: uint8 (H, W, C)
        del model
        return os.path.dirname(sheet)

