"""Sample from a DiT / VDiT checkpoint. See `python sample.py --help` and README.md."""
from opendit.parallel.process import run_script
from opendit.sampling.sample import main

if __name__ == "__main__":
    run_script(main)
