"""Deep clustering benchmark harness.

The package is import-light on purpose: torch, faiss and friends are imported
inside the functions that need them, so `python -m bench list` and every
SLURM job start quickly.
"""

__version__ = "0.1.0"
