"""GGUF export: llama.cpp's converter, quantization, a question asked in llama.cpp, and an Ollama Modelfile.

merged/ (HF safetensors) -> model.f16.gguf (convert_hf_to_gguf.py) -> model.<quant>.gguf (llama_model_quantize).
An export is written into a hidden staging folder in the run folder (STAGING) and published only when every file
passed its checks: the GGUFs, then the Modelfile, then export.json, each renamed into place. So a failed or killed
export leaves no GGUF under a final name, and the previous export's files stay as they were.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from titletune import fidelity, files, machine, ollama, prompts, roundtrip
from titletune.config import FIDELITY_ANSWER_TOKENS, FIDELITY_TOKENS
from titletune.converter import (
    CONVERTER_TYPES,
    QUANT_TYPES,
    convert,
    find_converter,
    llama_cpp_version,
    quantize,
)
from titletune.errors import Problems, UserError

log = logging.getLogger(__name__)

UNCHECKED = "gguf-unchecked"  # where an export whose llama.cpp crashed leaves the files it wrote (see _staging)
STAGING = ".export.partial"  # in the run folder: os.replace stays on one file system, so publishing copies nothing
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


def check_args(export_args, problems: Problems | None = None) -> list[str]:
    """The GGUF types of --gguf; every problem with the export flags, before training starts (raised at once, or added
    to `problems` for the caller to raise with its own)."""
    found = Problems() if problems is None else problems
    found.at_least("--fidelity-samples", export_args.fidelity_samples, 0, "0 skips the numbers")
    found.at_least("--fidelity-tokens", export_args.fidelity_tokens, 1)
    types: list[str] = []
    if not (export_args.gguf or "").replace(",", "").strip():  # "" or ",": not 'none', and no type either
        found.add(
            f"--gguf {export_args.gguf!r} names no GGUF type; give types such as --gguf q8_0,q4_k_m, or --gguf none "
            "to skip GGUF"
        )
    else:
        try:
            types = parse_gguf_types(export_args.gguf)
        except UserError as e:
            found.add(str(e).rstrip("."))
    if problems is None:
        found.done()
    return types


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


@dataclass
class Options:
    """What the caller chooses about an export; export_run fills it from ExportArguments and the run."""

    verify: bool = True  # each file answers `question` in llama.cpp, into its export.json entry
    llama_cpp_dir: str | None = None  # a llama.cpp checkout whose converter to use (converter.find_converter)
    question: str | None = None  # None: DEFAULT_QUESTION, asked through the system prompt
    # The 16-bit file the quants are made from; it is always written, and is replaced by bf16 when only bf16 is asked.
    outtype: str = "f16"
    # The run's products (fidelity.samples), what each file is measured on against merged/ (see fidelity.py): the
    # chat round trip of every 16-bit file, then the parity numbers of every file. None: one built-in example
    # product; []: the round trip on it, and no parity numbers.
    samples: list[fidelity.Sample] | None = None
    fidelity_tokens: int = FIDELITY_TOKENS  # greedy tokens compared per answer
    # Laid over the Modelfile's PARAMETERs (ollama.PARAMS, the report's greedy decoding): export_run adds the run's
    # answer length.
    decoding: dict | None = None


def export(
    run_dir: str | Path,
    merged_dir: str | Path,
    gguf_types: list[str],
    system_prompt: str,
    tokenizer,
    options: Options | None = None,
) -> dict:
    """merged/ -> model.<outtype>.gguf -> model.<quant>.gguf for each type -> checked in llama.cpp -> Modelfile ->
    export.json, in a staging folder published only when every check passed (see Options for the choices). Returns
    what export.json holds."""
    options = options or Options()
    run_dir, merged_dir = Path(run_dir), Path(merged_dir)
    types = parse_gguf_types(",".join(gguf_types))
    if not types:
        log.info("gguf: skipped (--gguf none)")
        return {}
    ordered = _order(types, options.outtype)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(files.STALE + ".gguf"):  # left by a run that was killed mid-write
        stale.unlink(missing_ok=True)
    chat_template = getattr(tokenizer, "chat_template", None)
    if not isinstance(chat_template, str) or not chat_template:
        # Without tokenizer.chat_template in the GGUF, llama.cpp silently falls back to the llama-2 prompt format.
        raise UserError(f"the tokenizer of {merged_dir} has no chat template, so no GGUF of it would chat correctly.")
    converter = find_converter(options.llama_cpp_dir)
    messages = prompts.messages(system_prompt, options.question or DEFAULT_QUESTION)
    example = [fidelity.Sample("example", prompts.messages(system_prompt, EXAMPLE[0]), EXAMPLE[1])]
    checked = list(options.samples) if options.samples else example  # the round trip always has a conversation
    measured = example if options.samples is None else list(options.samples)
    with _staging(run_dir) as staging:  # published when the block succeeds
        end, _, _ = fidelity.end_token(tokenizer, checked[0])
        stops = ollama.stop_tokens(tokenizer)
        round_trip = functools.partial(roundtrip.round_trip, tokenizer=tokenizer, chosen=checked, end=end, stops=stops)

        def write(gguf_type: str) -> dict:
            return _write(gguf_type, staging, merged_dir, ordered[0], converter, round_trip)

        written, merged_numbers = [], None
        with _reference(staging, merged_dir, tokenizer, measured, options.fidelity_tokens) as reference:
            if reference is not None:
                merged_numbers = _write_and_measure(write, reference, ordered, staging, written, options.verify)
            else:
                written += [write(gguf_type) for gguf_type in ordered]
                if options.verify:
                    _verify(staging, written, messages)
        modelfile = _modelfile(staging, types, written, chat_template, system_prompt, stops, options.decoding)
        report = {
            "llama_cpp_python": llama_cpp_version(),
            "converter": str(converter),
            "merged_dir": str(merged_dir),
            "question": messages,
            "modelfile": modelfile,
            "files": written,
        }
        if merged_numbers:
            report["fidelity_merged"] = merged_numbers
        files.write_atomic(staging / "export.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def _order(types: list[str], outtype: str) -> list[str]:
    """The order the files are written in: the 16-bit file the quants are made from first (`outtype`, unless only the
    other 16-bit type is asked for: then that one), the other 16-bit type, then the quants."""
    if outtype not in CONVERTER_TYPES:
        raise UserError(f"outtype must be one of {', '.join(CONVERTER_TYPES)}, got {outtype!r}.")
    sixteen = [t for t in types if t in CONVERTER_TYPES]
    base_type = outtype if outtype in sixteen or not sixteen else sixteen[0]
    return [base_type] + [t for t in sixteen if t != base_type] + [t for t in types if t in QUANT_TYPES]


@contextlib.contextmanager
def _reference(staging: Path, merged_dir: Path, tokenizer, measured: list[fidelity.Sample], max_tokens: int):
    """merged/'s side of the fidelity check (fidelity.reference) as a future, or None with no products to measure.
    It needs only merged/, so it runs in a thread while the converter writes the 16-bit file, on the cores the
    converter leaves (it is mostly one process reading and writing); its files go to a folder in `staging`."""
    with tempfile.TemporaryDirectory(prefix=".fidelity-", dir=staging) as tmp, ThreadPoolExecutor(1) as side:
        reference = None
        if measured:
            ref_end, rows = fidelity.tokenized(tokenizer, measured, FIDELITY_ANSWER_TOKENS)
            threads = max(1, machine.cpus() - 1)
            reference = side.submit(fidelity.reference, merged_dir, ref_end, rows, max_tokens, Path(tmp), threads)
        yield reference


def _verify(staging: Path, written: list[dict], messages: list[dict]) -> None:
    """Without parity numbers: each written file answers `messages` in llama.cpp, into its export.json entry."""
    for entry in written:
        got = _llama(staging / entry["name"], messages=messages, max_tokens=48)
        entry.update(verify_answer=got["answer"], verify_tokens=got["tokens"], verify_seconds=round(got["seconds"], 2))
        log.info(
            "verify: %s, %d tokens at %.0f tok/s: %r",
            entry["name"],
            got["tokens"],
            got["tokens"] / max(got["seconds"], 1e-9),
            got["answer"][:100],
        )


def _modelfile(
    staging: Path, types: list[str], written: list[dict], chat_template: str, system_prompt: str, stops, decoding
) -> dict:
    """The Modelfile for the first type asked for (--gguf q8_0,q4_k_m ships q8_0, and the fidelity table shows why),
    with Ollama's own template for the chat format when it is a known one. Returns its export.json entry."""
    shipped = next(entry for kind in types for entry in written if entry["type"] == kind)
    named = ollama.template_for(chat_template)
    if named is None:
        log.warning("Modelfile: unknown chat format; Ollama will guess the template from the GGUF, or use none")
    template = named[1] if named else None
    ollama.write_modelfile(staging, shipped["name"], system_prompt, stops, params=decoding, template=template)
    log.info("Modelfile: FROM ./%s, template %s, stop %s", shipped["name"], named[0] if named else "none", stops)
    return {"name": "Modelfile", "gguf": shipped["name"], "template": named[0] if named else None, "stop": stops}


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


def _write(gguf_type: str, run_dir: Path, merged_dir: Path, base_type: str, converter: Path, round_trip) -> dict:
    """One GGUF file: converted from merged/ (16-bit) or quantized from the 16-bit file; a 16-bit one is then checked
    by `round_trip` (roundtrip.round_trip on the export's conversations; quants copy its metadata and vocabulary).
    Returns its export.json entry."""
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
        trip = round_trip(path)  # a failure: export() drops the staging
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
        measured = _fidelity(run_dir, ref, parity, written, verify)  # the fidelity children also answer `verify`
    # What the check added beyond writing the files: merged/'s side not yet done when the 16-bit file was, the
    # children still running after the last file was written, and the chat round trips.
    checks = waited + time.perf_counter() - t0 + sum(e["round_trip_seconds"] for e in written)
    measured.update(waited_seconds=round(waited, 2), check_seconds=round(checks, 2))
    return measured


def _fidelity(run_dir: Path, ref: dict, parity, written: list[dict], verify: bool) -> dict:
    """Every written file measured against merged/'s reference (`parity`, a fidelity.Parity started on each), into
    its export.json entry; its answer to the run's first train question goes in as verify_* when `verify`. A 16-bit
    file unlike merged/ fails the export (export() drops every file written); a quant far from it is a warning."""
    measured = parity.results()
    failure = None
    for entry, measures in zip(written, measured, strict=True):
        got = measures.pop("verify")
        if verify:
            entry.update(verify_answer=got["answer"], verify_tokens=got["tokens"], verify_seconds=got["seconds"])
        entry["fidelity"] = measures
        log.info(
            "fidelity: %s, %.0f%% identical answers, KL %.4g, perplexity %s (merged/ %s), %s tok/s",
            entry["name"],
            100 * measures["identical"],
            measures["kl_divergence"],
            measures["perplexity"],
            measures["perplexity_merged"],
            measures["tokens_per_second"],
        )
        try:
            warning = fidelity.judge(entry["type"], measures)
        except UserError as e:
            failure = failure or e
            continue
        if warning:
            log.warning("fidelity: %s", warning)
            measures["warning"] = warning
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
        chosen = fidelity.samples(
            {"test": run.split("test"), "train": run.split("train")}, export_args.fidelity_samples
        )
        options = Options(
            verify=export_args.verify,
            llama_cpp_dir=export_args.llama_cpp_dir,
            question=question,
            samples=chosen,
            fidelity_tokens=export_args.fidelity_tokens,
            decoding=modelfile_decoding(run),
        )
        export(run.dir, run.merged, gguf_types, run.prompts.system, tokenizer, options)
    return run


def modelfile_decoding(run) -> dict:
    """The Modelfile's decoding for a run: the report's (engines.Sampling's defaults) and the run's answer length."""
    from titletune.engines import Sampling

    sampling = Sampling().for_run(run)
    return {
        "temperature": sampling.temperature,
        "repeat_penalty": sampling.repetition_penalty,
        "num_predict": sampling.max_new_tokens,
    }
