"""One quiet log for both entry points: a line per stage of ours, the libraries' lines only when they matter.

Call `setup()` first thing in an entry point: the libraries read these settings when they are imported.
"""

from __future__ import annotations

import logging
import os

# Import-time lines that mean nothing to a user, each harmless here (kept at ERROR, so real failures still show):
QUIET = (
    "torchao",  # "Failed to load .../_C_mxfp8...so": CUDA kernels of a package Unsloth imports; CPU never uses them
    "torch.utils._pytree",  # torchao registers enums that torch.compile now handles natively: a deprecation notice
    "bitsandbytes",  # "Failed to load CPU gemm_4bit_forward from kernels-community": an optional faster 4-bit kernel
)


def setup(level: int = logging.INFO, plain: bool = False) -> None:
    """Timestamped `name: message` lines at `level`; no per-stage progress bars of datasets (one per map: tokenizing,
    labels, truncating, each pass) or of transformers' weight loading, which print dozens of lines before training
    starts. The Trainer's own progress bar and ours stay. A user's own HF_*_PROGRESS_BARS setting wins. `plain`:
    the message alone (infer.py, whose output is its answers)."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" follows it
    layout = "%(message)s" if plain else "%(asctime)s %(name)s: %(message)s"
    logging.basicConfig(format=layout, datefmt="%H:%M:%S", level=level)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
