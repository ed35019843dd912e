"""GGUF export: llama.cpp's converter, quantization, a question asked in llama.cpp, and an Ollama Modelfile.

merged/ (HF safetensors) -> model.f16.gguf (convert_hf_to_gguf.py) -> model.<quant>.gguf (llama_model_quantize).
An export is written into a hidden staging folder in the run folder (STAGING) and published only when every file
passed its checks: the GGUFs, then the Modelfile, then export.json, each renamed into place. So a failed or killed
export leaves no GGUF under a final name, and the previous export's files stay as they were.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from titletune import fidelity, files, llamacpp, machine, ollama, prompts
from titletune.config import FIDELITY_ANSWER_TOKENS, FIDELITY_TOKENS, cache_dir
from titletune.errors import UserError

# llama_cpp is imported inside the functions below, never at module level: libgomp reads OMP_WAIT_POLICY once, when
# llama_cpp loads it, and titletune/__init__.py sets it first (machine.passive_openmp).

log = logging.getLogger(__name__)

CONVERTER = "convert_hf_to_gguf.py"
SDIST_ROOT = "vendor/llama.cpp/"
# What the converter imports or reads: conversion/ (one module per architecture), its own gguf-py (PyPI gguf 0.19.0
# lacks LazyChunkedTensor), and models/templates/ (chat templates some architectures embed). The other ~74 MB of the
# sdist (C++ sources, vocab test files) it never touches.
SDIST_PARTS = (CONVERTER, "conversion/", "gguf-py/", "models/templates/")

UNCHECKED = "gguf-unchecked"  # where an export whose llama.cpp crashed leaves the files it wrote (see _staging)
STAGING = ".export.partial"  # in the run folder: os.replace stays on one file system, so publishing copies nothing
CONVERTER_TYPES = ("f16", "bf16")  # written by convert_hf_to_gguf.py straight from the merged weights
QUANT_TYPES = {  # written by llama.cpp from the 16-bit file; values are llama_cpp.LLAMA_FTYPE_* names
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
GGUF_TYPES = CONVERTER_TYPES + tuple(QUANT_TYPES)

DEFAULT_QUESTION = "What can you tell me about this product?"
# Measured when export() is given no products of a run (a merged folder exported on its own): a made-up product.
EXAMPLE = (
    "What is 'Trail Running Socks, 3 Pack'?",
    "Cushioned merino wool socks for trail running, with a reinforced heel and toe. Sizes 6-12, 3 pairs.",
)

# ---------------------------------------------------------------------------------------------------------- types


def parse_gguf_types(spec: str | None) -> list[str]:
    """--gguf "q4_k_m,q8_0" -> ["q4_k_m", "q8_0"]; "none" or "" -> []. Raises UserError naming the valid types.

    The trainer calls this before training, so a typo fails in a second rather than after hours.
    """
    names = [part.strip().lower() for part in (spec or "").split(",") if part.strip()]
    if names == ["none"] or not names:
        return []
    bad = [name for name in names if name not in GGUF_TYPES]
    if bad:
        raise UserError(
            f"--gguf {spec!r}: unknown GGUF type {', '.join(bad)}. Valid types: {', '.join(GGUF_TYPES)}, "
            "comma-separated (e.g. --gguf q4_k_m,q8_0), or 'none' to skip GGUF."
        )
    return list(dict.fromkeys(names))


def check_args(export_args) -> list[str]:
    """The GGUF types of --gguf; every problem with the export flags at once, before training starts."""
    problems = []
    if export_args.fidelity_samples < 0:
        problems.append(f"--fidelity-samples must be >= 0 (0 skips the numbers), got {export_args.fidelity_samples}")
    if export_args.fidelity_tokens < 1:
        problems.append(f"--fidelity-tokens must be >= 1, got {export_args.fidelity_tokens}")
    if not (export_args.gguf or "").replace(",", "").strip():  # "" or ",": not 'none', and no type either
        problems.append(
            f"--gguf {export_args.gguf!r} names no GGUF type; give types such as --gguf q8_0,q4_k_m, or --gguf none "
            "to skip GGUF"
        )
    if problems:
        raise UserError("; ".join(problems) + ".")
    return parse_gguf_types(export_args.gguf)


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
    """convert_hf_to_gguf.py from --llama_cpp_dir, else $LLAMA_CPP_DIR, else the cache, which set-up fills from the
    sdist of the installed llama-cpp-python (so the converter matches the llama.cpp that loads its files).

    An export never downloads (`fetch` False): fetching runs pip, which prepares the sdist's metadata with the
    package's own build code, and needs the package index; set-up (`make setup`) does both once, so exports work
    offline and run no package code."""
    for source, folder in (("--llama_cpp_dir", llama_cpp_dir), ("LLAMA_CPP_DIR", os.environ.get("LLAMA_CPP_DIR"))):
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
            "`.venv/bin/python -c 'from titletune import export; export.fetch_converter()'` with the package index "
            "reachable); or pass --llama_cpp_dir with a llama.cpp checkout, or set LLAMA_CPP_DIR; or --gguf none."
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
                f"that holds it failed ({_tail(result.stderr or result.stdout, 3)}). Pass --llama_cpp_dir with a "
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
            raise UserError(f"{sdists[0].name} holds no {SDIST_ROOT}{CONVERTER}; pass --llama_cpp_dir instead.")
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


# --------------------------------------------------------------------------------------------------------- verify


def read_metadata(gguf_path: str | Path) -> dict[str, str]:
    """The GGUF's key/value metadata as strings (arrays summarised), read by llama.cpp without loading the weights."""
    return _llama(Path(gguf_path))["metadata"]


def verify(gguf_path: str | Path, question_messages: list[dict], max_tokens: int = 48) -> str:
    """Load a GGUF in llama.cpp and answer one chat question greedily, through the GGUF's own chat template."""
    return _llama(Path(gguf_path), messages=question_messages, max_tokens=max_tokens)["answer"]


def _llama(gguf_path: Path, messages: list[dict] | None = None, max_tokens: int = 48) -> dict:
    """The GGUF's metadata and, with `messages`, their greedy answer, from llama.cpp in a child (fidelity.child)."""
    return fidelity.child(gguf_path, {"op": "answer", "messages": messages, "max_tokens": max_tokens})


# --------------------------------------------------------------------------------------------------------- export


def export(
    run_dir: str | Path,
    merged_dir: str | Path,
    gguf_types: list[str],
    system_prompt: str,
    tokenizer,
    verify: bool = True,
    llama_cpp_dir: str | None = None,
    question: str | None = None,
    outtype: str = "f16",
    samples: list[fidelity.Sample] | None = None,
    fidelity_tokens: int = FIDELITY_TOKENS,
    decoding: dict | None = None,
) -> dict:
    """merged/ -> model.<outtype>.gguf -> model.<quant>.gguf for each type -> checked in llama.cpp -> Modelfile ->
    export.json. Returns what export.json holds. `outtype` is the 16-bit file the quants are made from; it is always
    written, and is replaced by bf16 when only bf16 is asked for.

    `samples` (the run's products; fidelity.samples) are what each file is measured on against merged/ (see
    fidelity.py): the chat round trip of every 16-bit file, then the parity numbers of every file. None: one built-in
    example product; []: the round trip on it, and no parity numbers. `decoding` is laid over the Modelfile's
    PARAMETERs (ollama.PARAMS, the report's greedy decoding): export_run adds the run's answer length."""
    run_dir, merged_dir = Path(run_dir), Path(merged_dir)
    types = parse_gguf_types(",".join(gguf_types))
    if not types:
        log.info("gguf: skipped (--gguf none)")
        return {}
    if outtype not in CONVERTER_TYPES:
        raise UserError(f"outtype must be one of {', '.join(CONVERTER_TYPES)}, got {outtype!r}.")
    sixteen = [t for t in types if t in CONVERTER_TYPES]
    base_type = outtype if outtype in sixteen or not sixteen else sixteen[0]
    ordered = [base_type] + [t for t in sixteen if t != base_type] + [t for t in types if t in QUANT_TYPES]
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(files.STALE + ".gguf"):  # left by a run that was killed mid-write
        stale.unlink(missing_ok=True)
    chat_template = getattr(tokenizer, "chat_template", None)
    if not isinstance(chat_template, str) or not chat_template:
        # Without tokenizer.chat_template in the GGUF, llama.cpp silently falls back to the llama-2 prompt format.
        raise UserError(f"the tokenizer of {merged_dir} has no chat template, so no GGUF of it would chat correctly.")
    converter = find_converter(llama_cpp_dir)
    messages = prompts.chat(system_prompt, question or DEFAULT_QUESTION)
    example = [fidelity.Sample("example", prompts.chat(system_prompt, EXAMPLE[0]), EXAMPLE[1])]
    checked = list(samples) if samples else example  # the round trip always has a conversation to render
    measured = example if samples is None else list(samples)
    with _staging(run_dir) as staging:  # published when the block succeeds
        end, _, _ = fidelity.end_token(tokenizer, checked[0])
        stops = ollama.stop_tokens(tokenizer)
        written = []
        with tempfile.TemporaryDirectory(prefix=".fidelity-", dir=staging) as tmp, ThreadPoolExecutor(1) as side:
            # merged/'s side of the fidelity check needs only merged/, so it runs while the converter writes the
            # 16-bit file, on the cores the converter leaves (it is mostly one process reading and writing).
            reference = None
            if measured:
                ref_end, rows = fidelity.prepare(tokenizer, measured, FIDELITY_ANSWER_TOKENS)
                threads = max(1, machine.cpus() - 1)
                reference = side.submit(
                    fidelity.reference, merged_dir, ref_end, rows, fidelity_tokens, Path(tmp), threads
                )

            def write(gguf_type: str) -> dict:
                return _write(gguf_type, staging, merged_dir, base_type, converter, tokenizer, checked, end, stops)

            merged_numbers = None
            if reference is not None:
                merged_numbers = _write_and_measure(write, reference, ordered, staging, written, verify)
            else:
                written += [write(gguf_type) for gguf_type in ordered]
                if verify:
                    for entry in written:
                        got = _llama(staging / entry["name"], messages=messages, max_tokens=48)
                        entry.update(
                            verify_answer=got["answer"],
                            verify_tokens=got["tokens"],
                            verify_seconds=round(got["seconds"], 2),
                        )
                        log.info(
                            "verify: %s, %d tokens at %.0f tok/s: %r",
                            entry["name"],
                            got["tokens"],
                            got["tokens"] / max(got["seconds"], 1e-9),
                            got["answer"][:100],
                        )

        # Ollama gets the first type asked for (--gguf q8_0,q4_k_m ships q8_0, and the fidelity table shows why).
        shipped = next(entry for kind in types for entry in written if entry["type"] == kind)
        named = ollama.template_for(chat_template)
        if named is None:
            log.warning("Modelfile: unknown chat format; Ollama will guess the template from the GGUF, or use none")
        template = named[1] if named else None
        ollama.write_modelfile(staging, shipped["name"], system_prompt, stops, params=decoding, template=template)
        log.info("Modelfile: FROM ./%s, template %s, stop %s", shipped["name"], named[0] if named else "none", stops)

        report = {
            "llama_cpp_python": llama_cpp_version(),
            "converter": str(converter),
            "merged_dir": str(merged_dir),
            "question": messages,
            "modelfile": {
                "name": "Modelfile",
                "gguf": shipped["name"],
                "template": named[0] if named else None,
                "stop": stops,
            },
            "files": written,
        }
        if merged_numbers:
            report["fidelity_merged"] = merged_numbers
        files.write_atomic(staging / "export.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


@contextlib.contextmanager
def _staging(run_dir: Path):
    """A staging folder in the run folder for one export. When the block succeeds its GGUFs are published, then the
    Modelfile that names one of them, then export.json, which describes them all (each an os.replace); a GGUF type
    this export did not write stays as it was. On any failure nothing is published. The folder is removed either way.
    """
    staging = run_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # left by an export that was killed
    staging.mkdir()
    try:
        try:
            yield staging
        except fidelity.EngineCrash as e:  # llama.cpp died, not a file: keep what was written, unpublished
            kept = run_dir / UNCHECKED
            shutil.rmtree(kept, ignore_errors=True)
            os.replace(staging, kept)
            raise fidelity.EngineCrash(
                f"{e}\nThe files written so far are kept, unchecked, in {kept}; once llama.cpp runs here, "
                f"`python train.py --export-only --run {run_dir}` exports and checks them again."
            ) from None
        names = [path.name for path in sorted(staging.glob("*.gguf"))]
        for name in [*names, "Modelfile", "export.json"]:
            os.replace(staging / name, run_dir / name)
        log.info("export: published %s, Modelfile and export.json", ", ".join(names))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write(gguf_type, run_dir: Path, merged_dir: Path, base_type, converter, tokenizer, checked, end, stops) -> dict:
    """One GGUF file: converted from merged/ (16-bit) or quantized from the 16-bit file; a 16-bit one is then checked
    by the chat round trip (quants copy its metadata and vocabulary). Returns its export.json entry."""
    path = run_dir / f"model.{gguf_type}.gguf"
    started = time.perf_counter()
    if gguf_type in CONVERTER_TYPES:
        convert(merged_dir, path, gguf_type, converter)
        source = merged_dir.name
    else:
        quantize(run_dir / f"model.{base_type}.gguf", path, gguf_type)
        source = f"model.{base_type}.gguf"
    seconds = time.perf_counter() - started
    log.info("gguf: %s from %s, %.0f MB in %.1f s", path.name, source, path.stat().st_size / 1e6, seconds)
    checked_at = time.perf_counter()
    if gguf_type in CONVERTER_TYPES:
        trip = fidelity.round_trip(path, tokenizer, checked, end, stops)  # a failure: export() drops the staging
        log.info(
            "check: %s renders %d conversations as transformers does (%s), answers end on %s, a stop",
            path.name,
            trip["conversations"],
            trip["chat_format"],
            trip["end_token"],
        )
    return {
        "name": path.name,
        "type": gguf_type,
        "source": source,
        "bytes": path.stat().st_size,
        "sha256": files.sha256(path),
        "seconds": round(seconds, 2),
        "round_trip_seconds": round(time.perf_counter() - checked_at, 2),
    }


def _write_and_measure(write, reference, ordered, run_dir: Path, written: list[dict], verify: bool) -> dict:
    """Every file written (`write`, into `written`) and measured against merged/'s reference: llama.cpp measures each
    file as soon as it is written (fidelity.Parity), the 16-bit one while the quants are made. merged/'s side
    (`reference`, a future) is usually done by the time the 16-bit file is. Returns export.json's fidelity_merged."""
    waited, ref, parity = 0.0, None, None
    with contextlib.ExitStack() as stack:
        for gguf_type in ordered:
            entry = write(gguf_type)
            written.append(entry)
            if parity is None:
                t0 = time.perf_counter()
                ref = reference.result()
                waited = time.perf_counter() - t0  # what merged/'s side cost beyond the converter's time
                parity = stack.enter_context(fidelity.Parity(ref, len(ordered)))
            parity.start(run_dir / entry["name"])
        t0 = time.perf_counter()
        numbers = _fidelity(run_dir, ref, parity, written, verify)  # the fidelity children also answer `verify`
    # What the check added beyond writing the files: merged/'s side not yet done when the 16-bit file was, the
    # children still running after the last file was written, and the chat round trips.
    checks = waited + time.perf_counter() - t0 + sum(e["round_trip_seconds"] for e in written)
    numbers.update(waited_seconds=round(waited, 2), check_seconds=round(checks, 2))
    return numbers


def _fidelity(run_dir: Path, ref: dict, parity, written: list[dict], verify: bool) -> dict:
    """Every written file measured against merged/'s reference (`parity`, a fidelity.Parity started on each), into
    its export.json entry; its answer to the run's first train question goes in as verify_* when `verify`. A 16-bit
    file unlike merged/ fails the export (export() drops every file written); a quant far from it is a warning."""
    measured = parity.results()
    failure = None
    for entry, numbers in zip(written, measured, strict=True):
        got = numbers.pop("verify")
        if verify:
            entry.update(verify_answer=got["answer"], verify_tokens=got["tokens"], verify_seconds=got["seconds"])
        entry["fidelity"] = numbers
        log.info(
            "fidelity: %s, %.0f%% identical answers, KL %.4g, perplexity %s (merged/ %s), %s tok/s",
            entry["name"],
            100 * numbers["identical"],
            numbers["kl_divergence"],
            numbers["perplexity"],
            numbers["perplexity_merged"],
            numbers["tokens_per_second"],
        )
        try:
            warning = fidelity.judge(entry["type"], numbers)
        except UserError as e:
            failure = failure or e
            continue
        if warning:
            log.warning("fidelity: %s", warning)
            numbers["warning"] = warning
    if failure:
        raise failure
    return {k: ref[k] for k in ("seconds", "tokens_per_second")}


def export_run(run, gguf_types: list[str], export_args, question: str | None = None, trust_remote_code: bool = False):
    """A run's GGUF files, Modelfile and export.json, from its merged/ (merged first from adapter/ when missing:
    the base in 16-bit + the adapter, which needs no unsloth). Each GGUF is loaded in llama.cpp and asked `question`,
    through the run's own system prompt. Returns the run; report.md and the card follow in pipeline.finish.
    trust_remote_code: the command's own --trust-remote-code, for the merge (Run.trust_remote_code: never the run
    folder's)."""
    from transformers import AutoTokenizer

    if not run.trained:
        raise UserError(f"{run.dir} has no trained adapter ({run.adapter}); finish training first.")
    tokenizer = AutoTokenizer.from_pretrained(run.adapter)
    if not (run.merged / "config.json").is_file():
        from titletune.backends import hf

        with files.staged_dir(run.merged) as staged:
            hf.merge(None, tokenizer, run.base_model, run.adapter, staged, run.trust_remote_code(trust_remote_code))
    if gguf_types:
        export(
            run.dir,
            run.merged,
            gguf_types,
            run.prompts.system,
            tokenizer,
            verify=export_args.verify,
            llama_cpp_dir=export_args.llama_cpp_dir,
            question=question,
            samples=fidelity.samples(
                {"test": run.split("test"), "train": run.split("train")}, export_args.fidelity_samples
            ),
            fidelity_tokens=export_args.fidelity_tokens,
            decoding=modelfile_decoding(run),
        )
    return run


def modelfile_decoding(run) -> dict:
    """The Modelfile's decoding for a run: the report's (generate.Sampling's defaults) and the run's answer length."""
    from titletune.generate import Sampling

    sampling = Sampling().for_run(run)
    return {
        "temperature": sampling.temperature,
        "repeat_penalty": sampling.repetition_penalty,
        "num_predict": sampling.max_new_tokens,
    }


# -------------------------------------------------------------------------------------------------------- helpers


def _tail(text: str | None, n: int) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return "\n".join(lines[-n:]) or "no output"
