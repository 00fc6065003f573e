"""`python -m opendit.export CKPT --output DIR`: see opendit/checkpoint/export.py."""
from opendit.checkpoint.export import main

if __name__ == "__main__":
    main()
