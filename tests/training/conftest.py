"""Shared flags for the training reliability tests (the tiny CPU run of tests/distributed)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distributed"))
from conftest import TRAIN_FLAGS, run_ranks  # noqa: E402,F401
