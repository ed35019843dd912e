"""Every GGUF the project opens in llama.cpp is opened here: one loader with the settings every CPU needs, and what a
crashed llama.cpp process means.

Why a loader of our own and not `llama_cpp.Llama(...)` at each call site: llama-cpp-python builds llama.cpp for the
machine it is installed on, so on an Intel Xeon with AMX (4th generation and later, most of today's cloud) it compiles
in llama.cpp's AMX matmul for quantized weights. That path dies with SIGILL on its first batch of a few dozen tokens
(`tilezero` in `ggml_backend_amx_mul_mat` on an OpenMP worker: the tile permission is requested on the main thread
only; llama.cpp PR #26954, issues #28756 and #28328). llama.cpp places weights in the AMX (and repack) buffers only
when a model is loaded with `use_extra_bufts`, which is on by default and which `Llama.__init__` does not expose; the
loader turns it off, as llama.cpp's own `--no-repack` flag does, on every CPU kind, so the same computation runs on
each; its cost against leaving it on is measured in bench/README.md ("llama.cpp on every CPU").

llama_cpp is imported inside the functions: libgomp reads OMP_WAIT_POLICY once, when llama_cpp loads it, and
titletune/__init__.py sets it first (machine.passive_openmp).
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import signal
from collections.abc import Iterator
from pathlib import Path

N_CTX = 2048  # the context every engine opens: question, retrieved entries and answer of the CPU and GPU presets

# The extra buffer types (AMX, repacked layouts) stay off on every CPU; see the module docstring.
USE_EXTRA_BUFFER_TYPES = False


def _model_defaults():
    """Make llama-cpp-python's model parameters start with the extra buffer types off (once per process).

    Llama.__init__ takes its llama_model_params from `llama_cpp.llama_cpp.llama_model_default_params()` and sets
    only the fields it has arguments for; wrapping that one function is the only way to reach `use_extra_bufts`
    without rebuilding llama.cpp. Every Llama of the process then loads the same way, the project's and a test's."""
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params
    if getattr(default, "titletune", False):
        return

    def params():
        p = default()
        p.use_extra_bufts = USE_EXTRA_BUFFER_TYPES
        return p

    params.titletune = True
    low.llama_model_default_params = params


def load(path: str | Path, n_ctx: int = N_CTX, threads: int | None = None, batch_threads: int | None = None, **kw):
    """A llama_cpp.Llama on `path`, quiet, with `threads` for generation and `batch_threads` (default: `threads`)
    for prompts. llama-cpp-python's own n_threads_batch default is every logical core, which collapsed under load."""
    import llama_cpp

    _model_defaults()
    if threads is not None:
        kw.update(n_threads=threads, n_threads_batch=batch_threads or threads)
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, verbose=False, **kw)


@contextlib.contextmanager
def captured_log() -> Iterator[list[str]]:
    """llama.cpp's log lines of the block, in a list, instead of on stderr (llama-cpp-python prints them there itself,
    warnings included). Only for in-process calls such as the quantizer; nothing else may use llama.cpp meanwhile."""
    import llama_cpp
    from llama_cpp import _logger

    text: list[bytes] = []

    @llama_cpp.llama_log_callback
    def keep(level, message, user_data):
        text.append(message or b"")

    lines: list[str] = []
    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        lines += b"".join(text).decode(errors="replace").splitlines()


_FALLBACK = re.compile(
    r"ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\w+)\)\s*->\s*falling back to\s+(\w+)"
)


def fallbacks(log: list[str]) -> str | None:
    """The quantizer's one line per tensor that a K-quant could not take, as one sentence; None when there were none.
    ("180 of 272 tensors fell back to q5_0/q8_0: their 576 columns are not a multiple of 256, which q4_K/q6_K need")"""
    found = [m.groups() for m in map(_FALLBACK.search, log) if m]
    if not found:
        return None
    total = next((m.group(1) for m in map(re.compile(r"of (\d+) tensor").search, log) if m), "?")
    cols = sorted({int(c) for c, *_ in found})
    blocks = sorted({int(b) for _, b, *_ in found})
    wanted = "/".join(sorted({w for *_, w, _ in found}))
    fallen = "/".join(sorted({f for *_, f in found}))
    return (
        f"{len(found)} of {total} tensors fell back to {fallen}: their {'/'.join(map(str, cols))} columns are not a "
        f"multiple of {'/'.join(map(str, blocks))}, which {wanted} need"
    )


def system_info() -> str:
    """llama.cpp's build line ("CPU : SSE3 = 1 | ... | AMX_INT8 = 1 | REPACK = 1 |"): what this build runs here."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace").strip()


def _signal(returncode: int) -> int:
    """The signal a child died by: a negative returncode, or 128 + signal from a shell; 0 for an ordinary exit."""
    return -returncode if returncode < 0 else returncode - 128 if 128 < returncode < 160 else 0


def crash(returncode: int) -> str | None:
    """What a llama.cpp child's exit status means when it died by a signal, as the sentence an error message needs;
    None for an ordinary exit."""
    number = _signal(returncode)
    if not number:
        return None
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    if number == signal.SIGILL:
        return (
            f"llama.cpp crashed with {name} (illegal instruction): its build ran an instruction this CPU or virtual "
            "machine does not run, so the GGUF file is not the cause. This happens when llama-cpp-python was built "
            "on another CPU (a copied .venv, or pip's wheel cache from another machine): rebuild it here with "
            "`.venv/bin/python -m pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python==0.3.36`"
        )
    if number == signal.SIGKILL:
        return (
            f"llama.cpp was killed ({name}), most often by the kernel when memory ran out: close other programs or "
            "use a smaller quant, and run the command again"
        )
    return f"llama.cpp crashed ({name})"


def not_the_file(returncode: int) -> bool:
    """Whether a llama.cpp child's death says nothing about the file it read: an illegal instruction (the build and
    the CPU) or SIGKILL (the kernel, out of memory). llama.cpp aborts (SIGABRT) on some broken files, so other signals
    stay the file's failure."""
    return _signal(returncode) in (signal.SIGILL, signal.SIGKILL)
