"""Training: the loop (train.py) and its parts: flags (args.py), experiment folders and resume (experiment.py), the
resumable data order (sampler.py), AdamW, clipping and the LR schedule (optim.py), the sharded EMA (ema.py) and
metrics (metrics.py)."""
