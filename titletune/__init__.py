"""titletune: fine-tune an instruct LLM to answer questions about catalogue products (see README.md)."""

import os

# Set before torch is imported (train.py and infer.py import titletune first). Measured on 2 cores (bench/README.md):
# beside one other busy process, OpenMP's spin-waiting threads made a CPU training step up to 40x slower (51 s instead
# of 1.3 s), while passive waiting held its speed. On a quiet, dedicated machine spinning is 1.2-1.5x faster: set
# OMP_WAIT_POLICY yourself there. A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
