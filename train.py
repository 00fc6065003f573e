"""Train a DiT / VDiT. See `python train.py --help` and README.md."""
from opendit.parallel.process import run_script
from opendit.training.train import main

if __name__ == "__main__":
    run_script(main)
