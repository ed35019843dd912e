"""titletune: fine-tune an instruct LLM to answer questions about catalogue products (see README.md)."""

import os

# Set before torch is imported (train.py and infer.py import titletune first). Measured on 2 cores: beside one other
# busy process, OpenMP's spin-waiting threads made a CPU training step 40x slower (51 s instead of 1.3 s); passive
# waiting avoids that collapse and costs nothing measurable on a quiet machine. A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
