"""Sampling: sample.py (images and videos by class or prompt), sample_ddp.py (FID sampling over many ranks), the
denoising loop (denoise.py), conditions (labels and prompts, conditions.py) and the shapes checker's report
(fidelity.py)."""
