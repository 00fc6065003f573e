"""Sample from a DiT / VDiT checkpoint. See `python sample.py --help` and README.md."""
from opendit.sampling.sample import main

if __name__ == "__main__":
    main()
