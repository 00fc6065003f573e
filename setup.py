# Kept for `pip install -e .` users; all metadata lives in pyproject.toml.
from setuptools import setup

setup()
