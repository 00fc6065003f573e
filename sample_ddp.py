"""DiT's FID sampler over many GPUs (torchrun). See `python sample_ddp.py --help` and README.md."""
from opendit.parallel.process import run_script
from opendit.sampling.sample_ddp import main

if __name__ == "__main__":
    run_script(main)
