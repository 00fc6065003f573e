"""Prepare data: a UCF101 tree or media folder -> CSV, any dataset -> latent cache. See `python preprocess.py -h`."""
from opendit.parallel.process import run_script
from opendit.preprocess import main

if __name__ == "__main__":
    run_script(main)
