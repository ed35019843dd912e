"""llama.cpp's two tools for the GGUF export: its converter and its quantizer.

convert_hf_to_gguf.py (found in a llama.cpp checkout, or in the cache that set-up fills once from the sdist of the
installed llama-cpp-python) writes a 16-bit GGUF from merged/; llama.cpp's own quantizer (llama_model_quantize)
writes the quants from that file. export.py runs both and checks what they wrote.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from titletune import files, llamacpp
from titletune.config import cache_dir
from titletune.errors import UserError

# llama_cpp is imported inside quantize(), never at module level: libgomp reads OMP_WAIT_POLICY once, when llama_cpp
# loads it, and titletune/__init__.py sets it first (machine.passive_openmp).

log = logging.getLogger(__name__)

CONVERTER = "convert_hf_to_gguf.py"
SDIST_ROOT = "vendor/llama.cpp/"
# What the converter imports or reads: conversion/ (one module per architecture), its own gguf-py (PyPI gguf 0.19.0
# lacks LazyChunkedTensor), and models/templates/ (chat templates some architectures embed). The other ~74 MB of the
# sdist (C++ sources, vocab test files) it never touches.
SDIST_PARTS = (CONVERTER, "conversion/", "gguf-py/", "models/templates/")
CONVERTER_TYPES = ("f16", "bf16")  # written by convert_hf_to_gguf.py straight from the merged weights
QUANT_TYPES = {  # written by llama.cpp from the 16-bit file; values are llama_cpp.LLAMA_FTYPE_* names
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}

# ------------------------------------------------------------------------------------------------------ converter


def check_sentencepiece() -> None:
    if importlib.util.find_spec("sentencepiece") is None:
        # The converter imports it for every Llama-family model, even one with no tokenizer.model.
        raise UserError("the GGUF converter needs sentencepiece: pip install sentencepiece==0.2.3 (or --gguf none).")


def llama_cpp_version() -> str:
    """The installed llama-cpp-python version, read without loading its shared library."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            "GGUF export needs llama-cpp-python: pip install 'llama-cpp-python[server]==0.3.36', "
            "or pass --gguf none to skip GGUF."
        ) from None


def find_converter(llama_cpp_dir: str | None = None, fetch: bool = False) -> Path:
    """convert_hf_to_gguf.py from --llama-cpp-dir, else $LLAMA_CPP_DIR, else the cache, which set-up fills from the
    sdist of the installed llama-cpp-python (so the converter matches the llama.cpp that loads its files).

    An export never downloads (`fetch` False): fetching runs pip, which prepares the sdist's metadata with the
    package's own build code, and needs the package index; set-up (`make setup`) does both once, so exports work
    offline and run no package code."""
    for source, folder in (("--llama-cpp-dir", llama_cpp_dir), ("LLAMA_CPP_DIR", os.environ.get("LLAMA_CPP_DIR"))):
        if folder:
            path = Path(folder).expanduser().resolve() / CONVERTER
            if not path.is_file():
                raise UserError(
                    f"{source}={folder} holds no {CONVERTER}; give the root folder of a llama.cpp checkout."
                )
            return path
    version = llama_cpp_version()
    cached = cache_dir() / f"llama.cpp-{version}" / CONVERTER
    if cached.is_file():
        return cached
    if not fetch:
        raise UserError(
            f"no llama.cpp converter ({CONVERTER}) in {cached.parent}: set-up fetches it once (make setup, or "
            "`.venv/bin/python -c 'from titletune import converter; converter.fetch_converter()'` with the package index "
            "reachable); or pass --llama-cpp-dir with a llama.cpp checkout, or set LLAMA_CPP_DIR; or --gguf none."
        )
    return _extract_converter(version, cached.parent)


def fetch_converter() -> Path:
    """Set-up's step: the converter of the installed llama-cpp-python in the cache, downloaded once (needs pip and
    the package index)."""
    return find_converter(fetch=True)


def _extract_converter(version: str, target: Path) -> Path:
    """pip download the llama-cpp-python sdist and unpack only the converter's files into `target`, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=target.parent) as tmp:
        started = time.perf_counter()
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        cmd += [f"llama-cpp-python=={version}", "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        sdists = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if result.returncode != 0 or not sdists:
            raise UserError(
                f"no llama.cpp converter ({CONVERTER}) found, and downloading the llama-cpp-python=={version} sdist "
                f"that holds it failed ({_tail(result.stderr or result.stdout, 3)}). Pass --llama-cpp-dir with a "
                "llama.cpp checkout or set LLAMA_CPP_DIR, or run once with the package index reachable "
                f"(it is then cached in {target.parent}); or pass --gguf none to skip GGUF."
            )
        unpacked = Path(tmp) / "llama.cpp"
        with tarfile.open(sdists[0]) as tar:
            members = []
            for member in tar.getmembers():
                # Paths inside are llama_cpp_python-<version>/vendor/llama.cpp/...; keep the part after that.
                _, sep, rel = member.name.partition("/" + SDIST_ROOT)
                if sep and rel and (rel == CONVERTER or rel.startswith(SDIST_PARTS[1:])):
                    member.name = rel
                    members.append(member)
            tar.extractall(unpacked, members=members, filter="data")  # "data": no links out, no absolute paths
        if not (unpacked / CONVERTER).is_file():
            raise UserError(f"{sdists[0].name} holds no {SDIST_ROOT}{CONVERTER}; pass --llama-cpp-dir instead.")
        if target.exists() and not (target / CONVERTER).is_file():
            shutil.rmtree(target)  # a damaged cache entry; a complete one (another process won) is kept
        try:
            os.replace(unpacked, target)
        except OSError:
            if not (target / CONVERTER).is_file():
                raise
    seconds = time.perf_counter() - started
    log.info("converter: extracted from the llama-cpp-python %s sdist into %s (%.0f s)", version, target, seconds)
    return target / CONVERTER


def convert(merged_dir: str | Path, out_path: str | Path, outtype: str = "f16", converter: Path | None = None) -> Path:
    """Run convert_hf_to_gguf.py on an HF model folder with this interpreter; raises UserError with its last lines."""
    merged_dir, out_path = Path(merged_dir), Path(out_path)
    if outtype not in CONVERTER_TYPES:
        raise UserError(f"convert: outtype must be one of {', '.join(CONVERTER_TYPES)}, got {outtype!r}.")
    if not (merged_dir / "config.json").is_file():
        raise UserError(f"{merged_dir} is not a merged model folder (no config.json); nothing to convert to GGUF.")
    check_sentencepiece()
    converter = Path(converter) if converter else find_converter()
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # it would make the converter import PyPI's gguf, which is too old for it
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(converter.parent / "gguf-py"), env.get("PYTHONPATH")) if p)
    with files.atomic_path(out_path) as tmp:
        cmd = [sys.executable, str(converter), str(merged_dir), "--outfile", str(tmp), "--outtype", outtype]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not tmp.is_file():
            raise UserError(
                f"converting {merged_dir} to GGUF failed (exit {result.returncode}):\n{_tail(result.stderr, 12)}"
            )
    return out_path


# ------------------------------------------------------------------------------------------------------- quantize


def quantize(src: str | Path, dst: str | Path, qtype: str) -> Path:
    """Quantize a 16-bit GGUF with llama.cpp's own quantizer (byte-identical to the llama-quantize tool)."""
    import ctypes

    import llama_cpp

    src, dst = Path(src), Path(dst)
    if qtype not in QUANT_TYPES:
        raise UserError(f"unknown quantization {qtype!r}; valid: {', '.join(QUANT_TYPES)}.")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[qtype])
    # llama.cpp logs a line per tensor that a K-quant cannot take (at hidden sizes not divisible by 256: most tensors
    # of the 135M model), at error level; they become one line, and the log is shown only when quantizing fails.
    with files.atomic_path(dst) as tmp:
        with llamacpp.captured_log() as lines:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            tail = "\n".join(lines[-6:]) or "no output"
            raise UserError(f"llama.cpp could not quantize {src.name} to {qtype} (return code {rc}):\n{tail}")
    summary = llamacpp.fallbacks(lines)
    if summary:
        log.info("gguf: %s: %s (expected for small models; real Llama sizes are multiples)", dst.name, summary)
    return dst


# -------------------------------------------------------------------------------------------------------- helpers


def _tail(text: str | None, n: int) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return "\n".join(lines[-n:]) or "no output"
