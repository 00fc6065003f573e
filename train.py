"""Train a DiT / VDiT. See `python train.py --help` and README.md."""
from opendit.training.train import main

if __name__ == "__main__":
    main()
