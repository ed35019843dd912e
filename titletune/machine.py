"""What this machine can do and how to use its cores: bf16, dtypes, the device, thread counts, OpenMP's wait policy.

Imports nothing heavy at module level (torch only inside functions), so the backend can be chosen with it before
unsloth, trl or transformers are imported.
"""

from __future__ import annotations

import os

from titletune.errors import UserError

MAX_LLAMA_THREADS = 8  # llama.cpp at batch 1 gains nothing past about 8 threads, only contention


def passive_openmp() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user set it. libgomp reads it once, when torch or llama_cpp loads it, so
    titletune/__init__.py calls this before either is imported. Measured on 2 cores (bench/README.md): beside one other
    busy process, spin-waiting threads made a CPU training step up to 40x slower (51 s instead of 1.3 s) and llama.cpp
    generation fall from 57 to 1-10 tok/s; passive waiting held its speed. On a quiet, dedicated machine spinning is
    1.2-1.5x faster: set OMP_WAIT_POLICY yourself there."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cpus() -> int:
    """The CPUs this process may run on (its affinity, as under taskset or a container), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def llama_threads() -> int:
    """llama.cpp threads (n_threads and n_threads_batch): about one per physical core, at most 8. More threads than
    cores make llama.cpp spin and stall, and n_threads_batch's own default (every logical core) collapsed under load."""
    return max(1, min(MAX_LLAMA_THREADS, cpus() // 2))


def bf16_supported() -> bool:
    """Whether bf16 pays here: a GPU with bf16, or a CPU with native bf16 (AVX512-BF16 / AMX); elsewhere on CPU it is
    emulated and slower than fp32."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def device() -> str:
    """cuda, cpu_bf16 (a CPU with native bf16) or cpu: the keys of backends.AUTO."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu_bf16" if bf16_supported() else "cpu"


def torch_dtype(name: str | None):
    """--dtype as a torch dtype, or None for auto (the backend picks); a bad name is a UserError."""
    import torch

    if name in (None, "", "auto"):
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserError(f"--dtype must be auto, bfloat16, float16 or float32, got {name!r}.")
    return dtype
