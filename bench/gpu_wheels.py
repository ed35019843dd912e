"""The wheels a bare CUDA machine lacks for the GPU check (bench/gpu_check.py prepare), and how they are made small.

The CUDA machines this check is written for have Python 3.12 with torch 2.11 (CUDA 13), transformers 5.17.0,
accelerate, peft, safetensors, tokenizers, numpy and pandas (and what those depend on), and no network at all.
Everything else the run path imports travels as wheels: TRL, datasets, Unsloth, bitsandbytes and titletune's own
needs. Published, those wheels are 151.5 MB; what travels with the checkout is at most 60 MiB, so the big ones are
repacked with only what a CUDA machine runs (DROP: Unsloth without its Studio app, bitsandbytes with its CUDA 13.0
and CPU libraries only, pyarrow without Flight, S3, headers and tests, Pillow without AVIF, lxml without objectify),
which makes 57.6 MiB. What does not fit, or is not needed, is listed as left out, with the reason, in manifest.json.

A repacked wheel keeps its name and version; its RECORD is rewritten for the files that remain (sha256 and size of
each), so pip installs and uninstalls it like the published one.
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_MIB = 60  # what travels with the working tree to the CUDA machine is at most 64 MiB, the checkout included
GPU_PYTHON = "3.12"
# pip download --platform matches tags exactly: every manylinux level up to glibc 2.28 (torch 2.11 needs 2.28)
GPU_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64")

# What travels: groups of wheels, in the order the budget takes them (a group goes whole or not at all), each with
# why the run path needs it. Versions are the pins of requirements-cpu.txt / requirements-nodeps.txt where there is
# one; the rest (UNPINNED) are the versions pip resolved beside those pins, so the CPU test suite ran exactly these.
WHEELS: list[tuple[tuple[str, ...], str]] = [
    (("trl",), "SFTTrainer"),
    (("datasets", "dill", "multiprocess", "xxhash"), "TRL's data"),
    (("requests", "urllib3", "charset-normalizer"), "imported by datasets"),
    (
        ("aiohttp", "aiohappyeyeballs", "aiosignal", "attrs", "frozenlist", "multidict", "propcache", "yarl"),
        "imported by datasets (fsspec's HTTP file system)",
    ),
    (("unsloth", "unsloth_zoo"), "the unsloth backend"),
    (("bitsandbytes",), "the 4-bit (NF4) base and 8-bit Adam"),
    (("pillow",), "unsloth_zoo.vision_utils imports PIL when unsloth is imported"),
    (("cut-cross-entropy",), "Unsloth's fused cross-entropy on CUDA"),
    (
        (
            "msgspec",
            "tyro",
            "docstring-parser",
            "typeguard",
            "einops",
            "protobuf",
            "wheel",
            "json5",
            "nest-asyncio",
            "structlog",
        ),
        "declared by unsloth and unsloth_zoo (small), so their metadata checks pass",
    ),
    (("orjson",), "titletune's data reader"),
    (("rouge-score", "absl-py", "nltk", "joblib", "six"), "titletune's evaluation: ROUGE with nltk's stemmer"),
    (("sacrebleu", "portalocker", "tabulate", "colorama", "lxml"), "titletune's evaluation: BLEU"),
    (("pyarrow",), "datasets' storage; datasets cannot be imported without it"),
    # Beside pyarrow these do not fit; with --machine-has pyarrow they do.
    (
        ("matplotlib", "fonttools", "kiwisolver", "contourpy", "cycler", "pyparsing"),
        "train.py's PNG plots (loss, data lengths, report)",
    ),
]
UNPINNED = {
    "dill": "0.4.1",
    "multiprocess": "0.70.19",
    "xxhash": "4.1.0",
    "requests": "2.34.2",
    "urllib3": "2.8.0",
    "charset-normalizer": "3.5.3",
    "aiohttp": "3.14.5",
    "aiohappyeyeballs": "2.7.1",
    "aiosignal": "1.4.0",
    "attrs": "26.1.0",
    "frozenlist": "1.8.0",
    "multidict": "7.2.1",
    "propcache": "0.5.4",
    "yarl": "1.25.1",
    "pillow": "13.0.0",
    "docstring-parser": "0.18.0",
    "typeguard": "4.6.1",
    "absl-py": "2.5.1",
    "nltk": "3.10.4",
    "joblib": "1.6.0",
    "six": "1.17.0",
    "portalocker": "4.4.2",
    "tabulate": "0.10.0",
    "colorama": "0.4.6",
    "lxml": "6.2.0",
    "pyarrow": "26.0.1",
    "wheel": "0.48.0",
    "matplotlib": "3.11.2",
    "fonttools": "4.69.1",
    "kiwisolver": "1.5.1",
    "contourpy": "1.3.3",
    "cycler": "0.12.1",
    "pyparsing": "3.3.3",  # requirements-cpu.txt: wheel>=0.42.0
}
# Published as a source package only; pure Python, so the wheel pip builds from it installs on any Python 3.
SDIST_ONLY = {"rouge-score"}
# Not in the folder, and why. The run fails at its first step, in one line, if the machine lacks one it needs.
LEFT_OUT = {
    "torch, transformers, accelerate, peft, safetensors, tokenizers, numpy, pandas": "on the CUDA machine already "
    "(with huggingface_hub, pyyaml, tqdm, jinja2, filelock, fsspec, psutil, regex, packaging and triton, which they "
    "require)",
    "llama-cpp-python": "GGUF export only (the check runs --gguf none): a 77 MB source package that compiles "
    "llama.cpp; export does not depend on the device and is tested on CPU",
    "torchvision, xformers": "CUDA builds tied to one torch; Unsloth runs without either (torchvision is only "
    "version-checked when present; attention falls back to torch's SDPA)",
    "torchao": "3.4 MB; Unsloth imports it only when present, for FP8 and torchao quantization, not for "
    "bitsandbytes QLoRA; a build for another torch would only add a risk",
    "diffusers, hf_transfer, sentencepiece": "declared by Unsloth, not imported on the QLoRA path (12 MB together); "
    "the tokenizer is a tokenizer.json",
    "unsloth Studio (studio/)": "removed from the unsloth wheel: Unsloth's web app (frontend and backend), 25 MB",
}
# Files removed from a wheel, by distribution: what a CUDA machine's QLoRA run never loads.
KEEP_BNB = re.compile(r"libbitsandbytes_(cpu|cuda130)\.so$")
DROP = {
    "unsloth": lambda f: f.startswith("studio/"),
    "bitsandbytes": lambda f: f.startswith("bitsandbytes/libbitsandbytes_") and not KEEP_BNB.search(f),
    # AVIF images (libavif, 2.2 MB): Pillow imports its AVIF codec only when one is opened, and guards the import.
    "pillow": lambda f: f.startswith(("pillow.libs/libavif", "PIL/_avif.")),
    # lxml.objectify and the compiled html.diff (Pure-Python html/diff.py stays): sacrebleu uses lxml.etree only.
    "lxml": lambda f: re.match(r"lxml/(objectify|html/diff|html/_difflib)\.cpython", f) is not None,
    # Flight and S3 are separate libraries no core module links; headers, Cython sources and tests are for
    # building against pyarrow; libarrow_python.so is there three times (the .so.2600 one is the one loaded).
    "pyarrow": lambda f: (
        re.match(r"pyarrow/(libarrow_flight|libarrow_s3|_flight|_s3fs|libarrow_python_flight)", f) is not None
        or f.startswith(("pyarrow/include/", "pyarrow/includes/", "pyarrow/tests/", "pyarrow/src/"))
        or f.endswith((".pyx", ".pxd", ".pxi", "libarrow_python.so", "libarrow_python.so.2600.1.0"))
    ),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
MANIFEST = "manifest.json"


def pins() -> dict[str, str]:
    """name -> version for every wheel in WHEELS: the requirement files' pins first, then UNPINNED."""
    found = dict(UNPINNED)
    for name in ("requirements-cpu.txt", "requirements-nodeps.txt"):
        for line in (ROOT / name).read_text().splitlines():
            match = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;#]+)", line.strip())
            if match:
                found[canonical(match.group(1))] = match.group(2)
    names = [n for group, _ in WHEELS for n in group]
    if missing := [n for n in names if canonical(n) not in found]:
        raise SystemExit(f"gpu_wheels: no version for {', '.join(missing)} (pin it, or add it to UNPINNED)")
    return {n: found[canonical(n)] for n in names}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download(versions: dict[str, str], dest: Path, python: str | None) -> None:
    """pip download every wheel (no dependencies: the list is complete) for `python` on manylinux x86_64, or, with
    python=None, for the interpreter running this. Source-only pure-Python packages are built into wheels."""
    dest.mkdir(parents=True, exist_ok=True)
    target = ["--python-version", python, "--implementation", "cp"] if python else []
    for platform in GPU_PLATFORMS if python else ():
        target += ["--platform", platform]
    binary = [f"{n}=={v}" for n, v in versions.items() if n not in SDIST_ONLY]
    pip(["download", "--only-binary", ":all:", "--no-deps", *target, "-d", str(dest), *binary])
    built = [f"{n}=={v}" for n, v in versions.items() if n in SDIST_ONLY]
    if built:
        pip(["wheel", "--no-deps", "-w", str(dest), *built])


def pip(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "--quiet", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if "ERROR" in line] or proc.stderr.splitlines()[-3:]
        raise SystemExit(f"gpu_wheels: pip {args[0]} failed: {' | '.join(lines)[-600:]}")


def wheel_name(path: Path) -> tuple[str, str]:
    """(canonical distribution name, version) from a wheel file name."""
    name, version = path.name.split("-")[:2]
    return canonical(name), version


def repack(wheel: Path, drop: Callable[[str], bool]) -> list[tuple[str, int]]:
    """Rewrite `wheel` without the files `drop` selects, with a RECORD regenerated for the files kept.

    Returns (path, size) of each file removed."""
    removed: list[tuple[str, int]] = []
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        record = next(i.filename for i in src.infolist() if i.filename.endswith(".dist-info/RECORD"))
        rows = []
        for info in src.infolist():
            if info.filename == record:
                continue
            if drop(info.filename):
                removed.append((info.filename, info.file_size))
                continue
            data = src.read(info)
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            if not info.is_dir():
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                rows.append([info.filename, f"sha256={digest}", str(len(data))])
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([*rows, [record, "", ""]])
        dst.writestr(src.getinfo(record), text.getvalue())
    tmp.replace(wheel)
    return removed


def copy_tokenizer(dest: Path) -> list[str]:
    """The embedded model's tokenizer and chat template (tokenizer.json gzipped), for the check's random models."""
    sys.path.insert(0, str(ROOT))
    from titletune import base_models

    source = base_models.embedded_hf_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if name == "tokenizer.json":
            with open(source / name, "rb") as f, gzip.open(dest / (name + ".gz"), "wb", compresslevel=9) as g:
                shutil.copyfileobj(f, g)
        else:
            shutil.copy(source / name, dest / name)
    return sorted(p.name for p in dest.iterdir())


def restore_tokenizer(folder: Path, dest: Path) -> None:
    """Write the tokenizer files from a prepared folder into a model folder."""
    for name in TOKENIZER_FILES:
        if name == "tokenizer.json":
            with gzip.open(folder / "tokenizer" / (name + ".gz"), "rb") as f, open(dest / name, "wb") as g:
                shutil.copyfileobj(f, g)
        else:
            shutil.copy(folder / "tokenizer" / name, dest / name)


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def prepare(
    dest: Path,
    python: str | None,
    budget_mib: float = BUDGET_MIB,
    machine_has: frozenset[str] = frozenset(),
    like: dict | None = None,
) -> dict:
    """Fill `dest` with the repacked wheels, the tokenizer and manifest.json; returns the manifest.

    python: the CUDA machine's Python (manylinux x86_64 wheels), groups taken in order while they fit the budget;
    machine_has: distributions the machine is known to have, left out. python=None: wheels for the interpreter
    running this (the CPU smoke test), exactly the distributions of `like` (a CUDA folder's manifest), no budget.
    """
    versions = pins()
    if like is not None:
        shipped = {canonical(w["name"]) for w in like["wheels"]}
        versions = {n: v for n, v in versions.items() if canonical(n) in shipped}
        assumed = list(like["assumed_on_machine"])
    else:
        versions = {n: v for n, v in versions.items() if canonical(n) not in machine_has}
        assumed = sorted(machine_has)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    wheels = []
    left_out = [{"name": n, "reason": r} for n, r in LEFT_OUT.items()]
    left_out += [{"name": n, "reason": "on the CUDA machine (--machine-has)"} for n in sorted(machine_has)]
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as tmp:
        download(versions, Path(tmp), python)
        files = {wheel_name(p)[0]: p for p in Path(tmp).glob("*.whl")}
        if missing := [n for n in versions if canonical(n) not in files]:
            raise SystemExit(f"gpu_wheels: pip gave no wheel for {', '.join(missing)}")
        tokenizer = copy_tokenizer(dest / "tokenizer")
        used = size(dest / "tokenizer") + 64 * 1024  # and this manifest
        for group, why in WHEELS:
            names = [n for n in group if n in versions]
            packed = []
            for name in names:
                path = files[canonical(name)]
                published = path.stat().st_size
                removed = repack(path, DROP[canonical(name)]) if canonical(name) in DROP else []
                packed.append((name, path, published, removed))
            group_size = sum(path.stat().st_size for _, path, _, _ in packed)
            if like is None and used + group_size > budget_mib * 2**20:
                reason = f"{why}: {group_size / 1e6:.1f} MB, over the {budget_mib:g} MiB budget; taken to be on the "
                reason += "CUDA machine (a --machine-has that frees room brings it in)"
                left_out.append({"name": ", ".join(names), "reason": reason})
                assumed += names
                continue
            used += group_size
            for name, path, published, removed in packed:
                shutil.copy(path, dest / path.name)
                wheels.append(
                    {
                        "name": name,
                        "version": wheel_name(path)[1],
                        "file": path.name,
                        "mb": round(path.stat().st_size / 1e6, 2),
                        "published_mb": round(published / 1e6, 2),
                        "group": group[0],
                        "why": why,
                        "removed": summarize(removed),
                    }
                )
    manifest = {
        "python": python or f"{sys.version_info.major}.{sys.version_info.minor} (the interpreter that prepared it)",
        "platforms": list(GPU_PLATFORMS) if python else "this machine's",
        "budget_mib": None if like is not None else budget_mib,
        "total_mib": None,
        "published_mb": round(sum(w["published_mb"] for w in wheels), 1),
        "wheels": wheels,
        "tokenizer": tokenizer,
        "left_out": left_out,
        "assumed_on_machine": assumed,  # needed by the run path, not in this folder
    }
    for _ in range(2):  # the manifest counts itself
        (dest / MANIFEST).write_text(json.dumps(manifest, indent=1))
        manifest["total_mib"] = round(size(dest) / 2**20, 2)
    if like is None and manifest["total_mib"] > budget_mib:
        raise SystemExit(f"gpu_wheels: {dest} holds {manifest['total_mib']} MiB, over the {budget_mib:g} MiB budget")
    return manifest


def summarize(removed: list[tuple[str, int]]) -> dict | None:
    """Removed files grouped by folder (or by file for top-level libraries): {group: MB unpacked}."""
    if not removed:
        return None
    groups: dict[str, int] = {}
    for path, n in removed:
        parts = path.split("/")
        key = "/".join(parts[:2]) + "/" if len(parts) > 2 else path
        groups[key] = groups.get(key, 0) + n
    top = sorted(groups.items(), key=lambda kv: -kv[1])
    return {
        "files": len(removed),
        "unpacked_mb": round(sum(n for _, n in removed) / 1e6, 1),
        "largest": {k: round(v / 1e6, 2) for k, v in top[:8]},
    }


def describe(manifest: dict) -> list[str]:
    """The folder as lines to print: each wheel with its size, what was removed, what was left out and why."""
    lines = [f"{'wheel':<20} {'version':<12} {'MB':>6}  (published MB)  why"]
    for w in manifest["wheels"]:
        published = f"({w['published_mb']:.1f})" if w["removed"] else ""
        why = w["why"] if w["name"] == w["group"] else ""
        lines.append(f"{w['name']:<20} {w['version']:<12} {w['mb']:>6.2f}  {published:<14}  {why}".rstrip())
        if w["removed"]:
            largest = ", ".join(f"{k} {v:.1f}" for k, v in list(w["removed"]["largest"].items())[:4])
            lines.append(
                f"{'':<20} removed {w['removed']['files']} files, {w['removed']['unpacked_mb']} MB "
                f"unpacked: {largest}, ..."
            )
    budget = f" of a {manifest['budget_mib']:g} MiB budget" if manifest["budget_mib"] else ""
    lines.append(
        f"total {manifest['total_mib']:.1f} MiB{budget} (published: {manifest['published_mb']:.1f} MB), "
        f"with the embedded tokenizer ({', '.join(manifest['tokenizer'])})"
    )
    lines.append("left out:")
    lines += [f"  {item['name']}: {item['reason']}" for item in manifest["left_out"]]
    return lines
