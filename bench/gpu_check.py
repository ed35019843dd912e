"""The CUDA path in one command, on a bare CUDA machine with no network: install, train, merge, measure.

On any machine with the package index, once (about 60 MiB of wheels into the ignored folder .gpu-wheels/):
    python bench/gpu_check.py prepare
Then, with the checkout and .gpu-wheels/ copied to the CUDA machine (Python 3.12 with torch; no network needed):
    python bench/gpu_check.py run --out gpu-check/                    # budgeted at 8 minutes on an H100
The same steps on CPU, as tests/test_gpu_check.py runs them:
    python bench/gpu_check.py prepare --for-this-python --dir .gpu-wheels-local
    python bench/gpu_check.py run --cpu-smoke --wheels .gpu-wheels-local --out /tmp/gpu-check

`run` does, with a time budget per part (printed first):
  a. install: pip install --no-index --no-deps --target <work>/site, beside the machine's own torch (the children
     get the folder on PYTHONPATH); every version printed; a package that does not import stops the run in one line.
  b. tiny: a random Llama-architecture model (hidden 256, 4 layers, the embedded model's tokenizer and chat
     template) in bf16 safetensors; the real train.py on it, --backend unsloth then --backend hf, both with
     --load-in-4bit true: 20 steps on data/sample_trn.json, --gguf none, 2 products evaluated. Checked: the loss
     fell, every LoRA B is non-zero, merged/ loads, merged/'s logits equal the adapter on the base it was merged
     into (unsloth: the dequantized 4-bit base; hf: the 16-bit base), report.json exists, Unsloth took its CUDA path.
  c. bench: bench/bench_gpu.py on random-weight models of Llama 3.2 3B's shape (and Llama 3.1 8B's, if time is
     left), at the 3B preset's settings, unsloth and hf in alternating rounds: tokens/s, s/step, peak VRAM.
  d. gpu_check.json and gpu_check.md in --out.
--cpu-smoke runs a and b on CPU: a fresh target folder from --no-index wheels, and children that see only what the
CUDA machine has (an empty virtual environment given this environment's copies of torch, transformers and the rest
of that list, see MACHINE_HAS), then train.py --backend hf with a 16-bit base. It proves that the wheel folder
completes that machine and that the run path works from it; not Unsloth's CUDA path, 4-bit, or any speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_wheels

ROOT = gpu_wheels.ROOT
SAMPLE = ROOT / "data" / "sample_trn.json"
# What the CUDA machines have (and what those require): the smoke test's children see exactly this, plus what a
# folder's manifest takes to be there. triton comes with torch's CUDA build.
MACHINE_HAS = ("torch", "transformers", "accelerate", "peft", "safetensors", "tokenizers", "numpy", "pandas", "triton")
# Imported one by one after the install, each in its own line of the report (unsloth apart: it patches the others).
MODULES = ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "pyarrow", "bitsandbytes")
MODULES += ("rouge_score", "sacrebleu", "nltk", "matplotlib", "orjson", "yaml", "PIL")
TINY = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
TINY["intermediate_size"] = 512
# Random-weight models of the presets' shapes: speed and memory do not depend on the weights.
LLAMA3 = {"num_key_value_heads": 8, "vocab_size": 128256}
SHAPES = {
    "llama3.2-3b": dict(
        LLAMA3,
        hidden_size=3072,
        num_hidden_layers=28,
        num_attention_heads=24,
        intermediate_size=8192,
        tie_word_embeddings=True,
    ),
    "llama3.1-8b": dict(
        LLAMA3,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        intermediate_size=14336,
        tie_word_embeddings=False,
    ),
}
# Seconds per part on an H100; a part's children are stopped at its end, and what a part leaves goes to the next.
# A bench child (imports, the 4-bit load of the random model, 2 + 8 steps) is estimated at about a minute for 3B, so
# two rounds of unsloth and hf; the 8B part runs only when TOTAL leaves it MIN_8B (its model is 16 GB on disk).
BUDGET = {"install": 60, "tiny unsloth": 90, "tiny hf": 60, "bench llama3.2-3b": 250}
TOTAL, MIN_8B = 480, 200
SMOKE_BUDGET = {"install": 300, "tiny hf": 600}  # 2 shared CPU cores, not an H100
TRAIN_FLAGS = ["--data", str(SAMPLE), "--max-steps", "20", "--learning-rate", "3e-3", "--warmup-steps", "0"]
TRAIN_FLAGS += ["--logging-steps", "1", "--save-steps", "20", "--gguf", "none", "--eval-samples", "2"]
TRAIN_FLAGS += ["--report-to", "none"]
# merged/ against the adapter on the base it was merged into, as the RMS of the logit difference over the RMS of
# the reference's centred logits. merged/ holds W + s*B@A rounded once to bf16 (relative error <= 2^-9 per weight)
# while the reference runs the LoRA branch beside W; on the tiny model that measured 0.004 (CPU, bf16, hf backend).
# A merge into the other base is 8x that (0.032 between the NF4 and the 16-bit base, same run), and one that lost
# the adapter is over 1 (the adapter's own effect); so 0.01, and a 4-bit run's merge must also sit closer to the
# base it names than to the other.
MERGE_TOLERANCE = 0.01
# Run by the machine's interpreter: its distributions, by canonical name; and the pip wheel ensurepip carries.
LIST_DISTRIBUTIONS = (
    "import importlib.metadata as m, json, re; "
    "print(json.dumps({re.sub(r'[-_.]+', '-', d.metadata['Name']).lower(): d.version for d in m.distributions()}))"
)
FIND_BUNDLED_PIP = (
    "import ensurepip, glob, os; "
    "print(glob.glob(os.path.join(os.path.dirname(ensurepip.__file__), '_bundled', 'pip-*.whl'))[0])"
)


# ---------------------------------------------------------------------------------------------------------- prepare


def prepare(args: argparse.Namespace) -> None:
    dest = Path(args.dir or (".gpu-wheels-local" if args.for_this_python else ".gpu-wheels")).resolve()
    like = None
    if args.for_this_python:
        like_dir = Path(args.like)
        if not (like_dir / gpu_wheels.MANIFEST).is_file():
            gpu_wheels.prepare(like_dir, gpu_wheels.GPU_PYTHON, args.budget_mib, machine_has(args))
        like = json.loads((like_dir / gpu_wheels.MANIFEST).read_text())
    started = time.perf_counter()
    python = None if args.for_this_python else gpu_wheels.GPU_PYTHON
    manifest = gpu_wheels.prepare(dest, python, args.budget_mib, machine_has(args), like)
    print(f"{dest}: wheels for Python {manifest['python']} ({time.perf_counter() - started:.0f} s)")
    print("\n".join(gpu_wheels.describe(manifest)))


def machine_has(args: argparse.Namespace) -> frozenset[str]:
    return frozenset(gpu_wheels.canonical(n) for n in (args.machine_has or "").split(",") if n.strip())


# -------------------------------------------------------------------------------------------------------------- run


class Clock:
    """The run's time budget: each part gets its seconds, and what one part saves the next may use."""

    def __init__(self, budget: dict[str, int], scale: float):
        self.budget = {k: v * scale for k, v in budget.items()}
        self.started = time.perf_counter()
        self.spent: dict[str, float] = {}

    def left(self, part: str) -> float:
        planned = sum(v for k, v in self.budget.items() if k in self.spent or k == part)
        return planned - (time.perf_counter() - self.started)

    def done(self, part: str, since: float) -> None:
        self.spent[part] = round(time.perf_counter() - since, 1)

    def rest(self, part: str, total: float) -> float:
        """Give `part` what is left of `total` seconds from the start; returns its seconds."""
        self.budget[part] = total - sum(v for k, v in self.budget.items() if k in self.spent)
        return self.left(part)


def child_env(site: Path) -> dict[str, str]:
    """The children's environment: the installed folder first on the path, and nothing that reaches a network."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "UNSLOTH_DISABLE_STATISTICS": "1",
        "MPLBACKEND": "Agg",
    }


def call(cmd: list[str], env: dict, timeout: float, log: Path, cwd: Path) -> tuple[int, str]:
    """Run a child with its output in `log`; (exit status, output). A child past its budget is stopped: 124."""
    with open(log, "w") as f:
        try:
            run = subprocess.run(
                cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, timeout=max(timeout, 1), check=False
            )
            rc = run.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, log.read_text(errors="replace")


def last_json(text: str) -> dict:
    """The last line of a child's output that is a JSON object ({} if none): children print their result last."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    return {}


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^(error: |\w+(Error|Exception)\b)", line)]
    return (errors or lines or ["(no output)"])[-1][:300]


def machine_python(cpu_smoke: bool, work: Path, manifest: dict) -> str:
    """The CUDA machine's own interpreter; for the smoke test, an empty virtual environment that sees only what a
    CUDA machine has (MACHINE_HAS and what it requires, plus what the manifest takes to be there), from here."""
    if not cpu_smoke:
        return sys.executable
    env_dir = work / "machine"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    base = work / "machine-site"
    base.mkdir()
    # What the folder ships stays out even where something here requires it (pillow, for matplotlib), so the
    # children import the folder's repacked copy.
    shipped = {gpu_wheels.canonical(w["name"]) for w in manifest["wheels"]}
    for dist in closure([*MACHINE_HAS, *manifest["assumed_on_machine"]]):
        if gpu_wheels.canonical(dist.metadata["Name"]) in shipped:
            continue
        for top in {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = Path(dist.locate_file(top))
            if top not in ("__pycache__", "bin") and source.exists() and not (base / top).exists():
                (base / top).symlink_to(source)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True, check=True
    ).stdout.strip()
    Path(site, "gpu_machine.pth").write_text(f"{base}\n")
    return str(python)


def closure(names: list[str]) -> list:
    """These distributions of this environment and every one they require (no extras)."""
    import importlib.metadata

    from packaging.requirements import Requirement

    found, stack = {}, list(names)
    while stack:
        name = gpu_wheels.canonical(stack.pop())
        if name in found:
            continue
        try:
            found[name] = dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    return list(found.values())


def install(wheels: Path, python: str, work: Path, clock: Clock, report: dict) -> dict[str, str] | None:
    """Part a: the folder's wheels into work/site (those the machine has at the same version stay out); then every
    module imported by the machine's interpreter. Returns the children's environment, or None after one line."""
    since = time.perf_counter()
    manifest = json.loads((wheels / gpu_wheels.MANIFEST).read_text())
    probe = subprocess.run([python, "-c", LIST_DISTRIBUTIONS], capture_output=True, text=True, check=True)
    have = json.loads(probe.stdout)
    site = work / "site"
    todo = [w for w in manifest["wheels"] if have.get(gpu_wheels.canonical(w["name"])) != w["version"]]
    report["install"] = {
        "wheels": {
            w["name"]: {
                "folder": w["version"],
                "machine": have.get(gpu_wheels.canonical(w["name"])),
                "installed": w in todo,
            }
            for w in manifest["wheels"]
        },
        "assumed_on_machine": {n: have.get(gpu_wheels.canonical(n)) for n in manifest["assumed_on_machine"]},
    }
    print(f"[install] {len(todo)} of {len(manifest['wheels'])} wheels into {site} (--no-index --no-deps)", flush=True)
    files = [str(wheels / w["file"]) for w in todo]
    cmd = [*pip_command(python), "install", "--quiet", "--no-index", "--no-deps", "--target", str(site), *files]
    rc, out = call(cmd, os.environ, clock.left("install"), work / "pip.log", work)
    if rc != 0:
        return fail(report, "install", f"pip install exited {rc}: {last_line(out)}")
    env = child_env(site)
    rc, out = call([python, __file__, "_versions", *MODULES], env, clock.left("install"), work / "versions.log", work)
    rc2, out2 = call(
        [python, __file__, "_versions", "--unsloth"], env, clock.left("install"), work / "unsloth.log", work
    )
    report["versions"] = {**last_json(out), **last_json(out2)}
    for name, v in report["versions"].items():
        where = "folder" if str(v.get("file", "")).startswith(str(site)) else "machine"
        where += f", CUDA {v['cuda']}" if v.get("cuda") else ""
        print(f"  {name:<16} {v.get('version') or '-':<22} {v.get('error') or where}", flush=True)
    clock.done("install", since)
    broken = [f"{n}: {v['error']}" for n, v in report["versions"].items() if v.get("error")]
    if rc or rc2 or broken:
        missing = [n for n in manifest["assumed_on_machine"] if not have.get(gpu_wheels.canonical(n))]
        hint = f" (not in the folder and not on this machine: {', '.join(missing)})" if missing else ""
        return fail(report, "install", (broken or [last_line(out if rc else out2)])[0] + hint)
    return env


def pip_command(python: str) -> list[str]:
    """`python -m pip`, or, where the interpreter has no pip, pip run from the wheel ensurepip bundles (offline)."""
    if subprocess.run([python, "-m", "pip", "--version"], capture_output=True, check=False).returncode == 0:
        return [python, "-m", "pip"]
    bundled = subprocess.run([python, "-c", FIND_BUNDLED_PIP], capture_output=True, text=True, check=False)
    return [python, f"{bundled.stdout.strip()}/pip"]


def fail(report: dict, part: str, line: str) -> None:
    report.setdefault("failed", {})[part] = line
    print(f"gpu_check: {part}: {line}", file=sys.stderr, flush=True)


def tiny_model(wheels: Path, python: str, env: dict, work: Path, report: dict) -> bool:
    """The random tiny Llama with the folder's tokenizer, in work/tiny; the device goes into the report."""
    (work / "tiny").mkdir()
    gpu_wheels.restore_tokenizer(wheels, work / "tiny")
    cmd = [python, __file__, "_model", str(work / "tiny"), "--shape", "tiny"]
    rc, out = call(cmd, env, 120, work / "model-tiny.log", work)
    if rc != 0:
        fail(report, "tiny model", last_line(out))
        return False
    report["device"] = out.splitlines()[-1]
    return True


def tiny_run(backend: str, four_bit: bool, python: str, env: dict, work: Path, clock: Clock, report: dict) -> None:
    """Part b for one backend: train.py on the tiny model, then the checks of _verify."""
    part = f"tiny {backend}"
    since = time.perf_counter()
    run_dir = work / f"run-{backend}"
    cmd = [
        python,
        str(ROOT / "train.py"),
        "--backend",
        backend,
        "--load-in-4bit",
        str(four_bit).lower(),
        "--model-name-or-path",
        str(work / "tiny"),
        "--output-dir",
        str(run_dir),
        *TRAIN_FLAGS,
    ]
    print(
        f"[{part}] train.py --backend {backend} --load-in-4bit {str(four_bit).lower()} ({clock.left(part):.0f} s left)",
        flush=True,
    )
    started = time.perf_counter()
    rc, log = call(cmd, env, clock.left(part), work / f"train-{backend}.log", work)
    result = {"train_s": round(time.perf_counter() - started, 1), "exit": rc}
    report.setdefault("tiny", {})[backend] = result
    if rc != 0:
        clock.done(part, since)
        return fail(report, part, f"train.py exited {rc}: {last_line(log)}")
    if backend == "unsloth":
        result["unsloth_cuda_path"] = "Fast Llama patching" in log and "no GPU found" not in log
    cmd = [python, __file__, "_verify", str(run_dir), "--backend", backend, *(["--four-bit"] if four_bit else [])]
    rc, out = call(cmd, env, clock.left(part), work / f"verify-{backend}.log", work)
    if rc != 0:
        clock.done(part, since)
        return fail(report, part, f"verify exited {rc}: {last_line(out)}")
    result.update(last_json(out))
    checks = {
        "loss fell": result["loss_last"] < result["loss_first"],
        "every LoRA B non-zero": result["lora_b_zero"] == 0 and result["lora_b"] > 0,
        "merged/ loads": result["merged_loads"],
        "merged/ = adapter on its base": result["merge_error"] <= MERGE_TOLERANCE
        and (result["merge_error_other_base"] is None or result["merge_error"] < result["merge_error_other_base"] / 2),
        "report.json written": (run_dir / "report.json").is_file(),
    }
    if backend == "unsloth":
        checks["Unsloth's CUDA path"] = result["unsloth_cuda_path"]
    result["checks"] = checks
    clock.done(part, since)
    print(
        f"  loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}; merge error {result['merge_error']:.4f} "
        f"(tolerance {MERGE_TOLERANCE}); " + ", ".join(f"{k}: {'ok' if v else 'FAILED'}" for k, v in checks.items()),
        flush=True,
    )
    if not all(checks.values()):
        fail(report, part, "failed: " + ", ".join(k for k, v in checks.items() if not v))


def bench(shape: str, python: str, env: dict, work: Path, clock: Clock, report: dict, rounds: int, steps: int) -> None:
    """Part c for one shape: a random-weight model, then bench_gpu.py one backend at a time, in alternating rounds,
    while the part's budget leaves time for one more child."""
    part = f"bench {shape}"
    since = time.perf_counter()
    print(f"[{part}] {clock.left(part):.0f} s left", flush=True)
    model = work / shape
    rc, out = call(
        [python, __file__, "_model", str(model), "--shape", shape],
        env,
        clock.left(part),
        work / f"model-{shape}.log",
        work,
    )
    rows: list[dict] = []
    result = {"rows": rows, "build": out.splitlines()[-1] if rc == 0 else last_line(out)}
    report.setdefault("bench", {})[shape] = result
    child_s = 0.0
    for k in range(rounds):
        for backend in ("unsloth", "hf") if k % 2 == 0 else ("hf", "unsloth"):
            if rc != 0 or clock.left(part) < child_s:  # a child stopped at the deadline measures nothing
                break
            t0 = time.perf_counter()
            out_json = work / f"bench-{shape}-{backend}-{k}.json"
            cmd = [
                python,
                str(ROOT / "bench" / "bench_gpu.py"),
                "--backends",
                backend,
                "--model",
                str(model),
                "--steps",
                str(steps),
                "--warmup",
                "2",
                "--json",
                str(out_json),
            ]
            rc_b, log = call(cmd, env, clock.left(part), work / f"bench-{shape}-{backend}-{k}.log", work)
            if rc_b == 0:
                rows += [{**r, "round": k + 1} for r in json.loads(out_json.read_text())]
                r = rows[-1]
                print(
                    f"  round {k + 1} {backend}: {r['tok_s']:.0f} tok/s, {r['step_s']:.2f} s/step, peak "
                    f"{r['peak_allocated_gb']:.2f} GB allocated, {r['peak_reserved_gb']:.2f} GB reserved",
                    flush=True,
                )
            else:
                rows.append({"backend": backend, "round": k + 1, "error": last_line(log)})
                print(f"  round {k + 1} {backend}: {rows[-1]['error']}", flush=True)
            child_s = max(child_s, time.perf_counter() - t0)
    shutil.rmtree(model, ignore_errors=True)
    clock.done(part, since)
    if rc != 0:
        fail(report, part, f"the random model: {result['build']}")
    elif failed := [r["backend"] for r in rows if "error" in r]:
        fail(report, part, f"{', '.join(failed)} failed: {next(r['error'] for r in rows if 'error' in r)}")


def run(args: argparse.Namespace) -> int:
    wheels = Path(args.wheels or (".gpu-wheels-local" if args.cpu_smoke else ".gpu-wheels")).resolve()
    if not (wheels / gpu_wheels.MANIFEST).is_file():
        print(
            f"gpu_check: {wheels} has no {gpu_wheels.MANIFEST}; run `python bench/gpu_check.py prepare` first, "
            "on a machine with the package index.",
            file=sys.stderr,
        )
        return 2
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    for stale in ("site", "machine", "machine-site", "tiny", *[p.name for p in work.glob("run-*")]):
        shutil.rmtree(work / stale, ignore_errors=True)
    budget = SMOKE_BUDGET if args.cpu_smoke else dict(BUDGET)
    if args.no_bench:
        budget = {k: v for k, v in budget.items() if not k.startswith("bench")}
    clock = Clock(budget, args.budget_scale)
    print(
        "time budget: " + ", ".join(f"{k} {v:.0f} s" for k, v in clock.budget.items()) + " (a part's leftover "
        f"goes to the next; the 8B bench runs only if {MIN_8B} s of {TOTAL} are left)",
        flush=True,
    )
    started = time.perf_counter()
    report: dict = {"mode": "cpu smoke" if args.cpu_smoke else "cuda", "wheels": str(wheels), "work": str(work)}
    manifest = json.loads((wheels / gpu_wheels.MANIFEST).read_text())
    this = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python"].split()[0] != this:
        print(
            f"gpu_check: {wheels} holds wheels for Python {manifest['python'].split()[0]}, and this is Python "
            f"{this}. Prepare a folder for it: python bench/gpu_check.py prepare --for-this-python",
            file=sys.stderr,
        )
        return 2
    python = machine_python(args.cpu_smoke, work, manifest)
    env = install(wheels, python, work, clock, report)
    if env is not None and tiny_model(wheels, python, env, work, report):
        backends = [("hf", False)] if args.cpu_smoke else [("unsloth", True), ("hf", True)]
        for backend, four_bit in backends:
            tiny_run(backend, four_bit, python, env, work, clock, report)
        if "bench llama3.2-3b" in clock.budget:
            bench("llama3.2-3b", python, env, work, clock, report, args.rounds, args.steps)
            if clock.rest("bench llama3.1-8b", TOTAL * args.budget_scale) >= MIN_8B * args.budget_scale:
                bench("llama3.1-8b", python, env, work, clock, report, args.rounds, args.steps)
            else:
                left = clock.budget.pop("bench llama3.1-8b")
                report["bench"]["llama3.1-8b"] = {"skipped": f"{left:.0f} s of the {TOTAL} s budget left"}
                print(f"[bench llama3.1-8b] skipped: {left:.0f} s of the {TOTAL} s budget left", flush=True)
    report["parts_s"] = clock.spent
    report["budget_s"] = clock.budget
    report["total_s"] = round(time.perf_counter() - started, 1)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / "gpu_check.md").write_text(markdown(report))
    for log in work.glob("*.log"):
        shutil.copy(log, out_dir / log.name)
    for run_dir in work.glob("run-*"):
        for name in ("run_config.yaml", "train_log.jsonl", "report.json", "report.md"):
            if (run_dir / name).is_file():
                (out_dir / run_dir.name).mkdir(exist_ok=True)
                shutil.copy(run_dir / name, out_dir / run_dir.name / name)
    print(
        f"gpu_check: {'FAILED' if report.get('failed') else 'passed'} in {report['total_s']:.0f} s; "
        f"{out_dir / 'gpu_check.md'}",
        flush=True,
    )
    if not args.work and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if report.get("failed") else 0


def markdown(report: dict) -> str:
    lines = [
        f"# GPU check ({report['mode']})",
        "",
        f"Device: {report.get('device', '?')}. Total {report['total_s']:.0f} s; parts (s): "
        + json.dumps(report["parts_s"]),
        "",
    ]
    if report.get("failed"):
        lines += ["**Failed:**", *[f"- {k}: {v}" for k, v in report["failed"].items()], ""]
    lines += ["| package | version | from |", "|---|---|---|"]
    for name, v in report.get("versions", {}).items():
        lines.append(f"| {name} | {v.get('version') or '-'} | {v.get('error') or v.get('file', '')} |")
    for backend, r in report.get("tiny", {}).items():
        lines += ["", f"## tiny model, {backend}", ""]
        lines += [f"- {k}: {v}" for k, v in r.items() if k != "checks"]
        lines += [f"- check {k}: {'ok' if v else 'FAILED'}" for k, v in r.get("checks", {}).items()]
    for shape, b in report.get("bench", {}).items():
        lines += ["", f"## bench, {shape} (random weights, 3B preset settings)", ""]
        if "skipped" in b:
            lines.append(f"skipped: {b['skipped']}")
            continue
        lines += [
            "| round | backend | tok/s | s/step | peak allocated GB | peak reserved GB | load s | losses |",
            "|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in b["rows"]:
            if "error" in r:
                lines.append(f"| {r['round']} | {r['backend']} | failed: {r['error']} ||||||")
            else:
                lines.append(
                    f"| {r['round']} | {r['backend']} | {r['tok_s']:.0f} | {r['step_s']:.2f} | "
                    f"{r['peak_allocated_gb']:.2f} | {r['peak_reserved_gb']:.2f} | {r['load_s']:.0f} | "
                    f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} |"
                )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- children (the machine's python)


def child_versions(names: list[str], unsloth: bool) -> None:
    """Import each module; print {name: {version, file} or {error}} as the last line."""
    import importlib
    import importlib.metadata

    found = {}
    if unsloth:
        names = ["unsloth", "unsloth_zoo"]
    dists = importlib.metadata.packages_distributions()
    for name in names:
        try:
            module = importlib.import_module(name)
            version = importlib.metadata.version(dists[name][0]) if name in dists else module.__version__
            found[name] = {"version": version, "file": getattr(module, "__file__", "")}
        except Exception as e:  # noqa: BLE001 - any failure to import is the finding
            found[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    if unsloth and "error" not in found["unsloth"]:
        cpu = getattr(sys.modules["unsloth"], "_IS_CPU_BACKEND", None)
        found["unsloth"]["path"] = {True: "CPU backend", False: "CUDA", None: "?"}[cpu]
    if "bitsandbytes" in found and "error" not in found["bitsandbytes"]:
        # A native library that fails to load is no import error: bitsandbytes puts a stand-in that raises later.
        from bitsandbytes import cextension

        loaded = getattr(getattr(cextension.lib, "_lib", None), "_name", None)
        found["bitsandbytes lib"] = (
            {"version": cextension.BNB_BACKEND, "file": loaded}
            if loaded
            else {"error": f"no {cextension.BNB_BACKEND} library loaded ({type(cextension.lib).__name__})"}
        )
    if "torch" in found and "error" not in found["torch"]:
        import torch

        found["torch"]["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    print(json.dumps(found))


def child_model(folder: Path, shape: str) -> None:
    """A random-weight Llama in bf16 safetensors with the embedded model's tokenizer (already in `folder` for the
    tiny model, copied from the tiny model's folder for the others)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tiny = folder.parent / "tiny"
    if folder != tiny:
        folder.mkdir(parents=True, exist_ok=True)
        for name in gpu_wheels.TOKENIZER_FILES:
            shutil.copy(tiny / name, folder / name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dims = {**TINY, "vocab_size": len(tokenizer), "tie_word_embeddings": True} if shape == "tiny" else SHAPES[shape]
    config = LlamaConfig(
        **dims,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the GPU: an 8B model in fp32 would be 32 GB
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{name}; {shape}: {params / 1e6:.1f}M parameters, {json.dumps(dims)}")


def child_verify(run_dir: Path, backend: str, four_bit: bool) -> None:
    """The checks on a finished run; prints them as JSON, last line."""
    import torch
    import yaml
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    config = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    base = config["base_model"]
    losses = [
        json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    lora_b = {k: float(v.float().abs().max()) for k, v in adapter.items() if "lora_B" in k}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    rows = [json.loads(line) for line in (run_dir / "data" / "train.jsonl").read_text().splitlines()[:4]]
    texts = [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows]
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128).to(device)

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            out = model(**batch).logits.float()
        return out[batch["attention_mask"].bool()]

    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).pow(2).mean().sqrt() / (b - b.mean(-1, keepdim=True)).pow(2).mean().sqrt())

    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.bfloat16).to(device).eval()
    got = logits(merged)
    del merged
    refs = {}
    for kind in ("16-bit", "4-bit") if four_bit else ("16-bit",):
        if kind == "4-bit":
            quant = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=config["model"].get("bnb_4bit_quant_type") or "nf4",
                # Unsloth's loader always nests the quantization (unsloth/models/llama.py BitsAndBytesConfig)
                bnb_4bit_use_double_quant=backend == "unsloth" or bool(config["model"].get("use_bnb_nested_quant")),
                bnb_4bit_compute_dtype=torch.bfloat16,
                llm_int8_skip_modules=["lm_head"],
            )
            model = AutoModelForCausalLM.from_pretrained(
                base, quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0} if device == "cuda" else None
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(device)
        model = PeftModel.from_pretrained(model, str(run_dir / "adapter")).eval()
        with_adapter = logits(model)
        with model.disable_adapter():
            without = logits(model)
        refs[kind] = {"merge": distance(got, with_adapter), "adapter_effect": distance(with_adapter, without)}
        del model
    # Unsloth merges into the dequantized 4-bit base it trained (save.py _merge_lora: fast_dequantize, then the
    # LoRA product added in fp32); the hf backend reloads the 16-bit base and merges there (backends/hf.py merge).
    merged_into = "4-bit" if four_bit and backend == "unsloth" else "16-bit"
    print(
        json.dumps(
            {
                "loss_first": losses[0],
                "loss_last": losses[-1],
                "steps_logged": len(losses),
                "lora_b": len(lora_b),
                "lora_b_zero": sum(v == 0 for v in lora_b.values()),
                "lora_b_min_max_abs": min(lora_b.values(), default=0.0),
                "merged_loads": True,
                "merged_into": merged_into,
                "merge_error": refs[merged_into]["merge"],
                "merge_error_other_base": next((r["merge"] for k, r in refs.items() if k != merged_into), None),
                "references": refs,
            }
        )
    )


# ------------------------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="download and repack the wheels a CUDA machine lacks (needs the package index)")
    p.add_argument(
        "--dir", help="the folder to fill (default .gpu-wheels, or .gpu-wheels-local with --for-this-python)"
    )
    p.add_argument(
        "--for-this-python",
        action="store_true",
        help="wheels for this interpreter and machine, the same distributions as --like (the CPU smoke)",
    )
    p.add_argument("--like", default=".gpu-wheels", help="with --for-this-python: the CUDA folder to mirror")
    p.add_argument("--machine-has", help="comma list of distributions the CUDA machine has; they stay out")
    p.add_argument("--budget-mib", type=float, default=gpu_wheels.BUDGET_MIB)
    r = sub.add_parser("run", help="install, train, check and measure (a CUDA machine; --cpu-smoke on CPU)")
    r.add_argument("--out", required=True, help="gpu_check.json, gpu_check.md and the logs go here")
    r.add_argument("--wheels", help="the prepared folder (default .gpu-wheels, or .gpu-wheels-local with --cpu-smoke)")
    r.add_argument("--work", help="models, runs and the install (default: a temporary folder, removed at the end)")
    r.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    r.add_argument("--cpu-smoke", action="store_true", help="parts a and b on CPU: hf backend, 16-bit base")
    r.add_argument("--no-bench", action="store_true", help="skip part c")
    r.add_argument("--rounds", type=int, default=2, help="bench rounds per backend, alternating (budget allowing)")
    r.add_argument("--steps", type=int, default=8, help="timed bench steps per run (after 2 warm-up steps)")
    r.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    for name in ("_versions", "_model", "_verify"):
        c = sub.add_parser(name)
        c.add_argument("args", nargs="*")
        c.add_argument("--unsloth", action="store_true")
        c.add_argument("--shape")
        c.add_argument("--backend")
        c.add_argument("--four-bit", action="store_true")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args)
        return 0
    if args.command == "run":
        return run(args)
    if args.command == "_versions":
        child_versions(args.args, args.unsloth)
    elif args.command == "_model":
        child_model(Path(args.args[0]), args.shape)
    else:
        child_verify(Path(args.args[0]), args.backend, args.four_bit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
