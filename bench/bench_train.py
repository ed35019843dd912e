"""CPU training throughput: TRL's SFTTrainer + peft LoRA on SmolLM2-135M-Instruct, one configuration per subprocess.

    .venv/bin/python bench/bench_train.py                                 # 8 configurations once, 3-5 min
    .venv/bin/python bench/bench_train.py --steps 8 --rounds 2            # order A..H then H..A, ~12 min
    .venv/bin/python bench/bench_train.py --configs default,padded_full --rounds 4 --json /tmp/train.json
    .venv/bin/python bench/bench_train.py --configs default --profile     # where a step's CPU time goes

Every configuration trains the embedded SmolLM2-135M-Instruct (base_models.embedded_hf_dir()) with LoRA r=16 on all 7
projections, batch 4, on rows rendered from data/sample_trn.json exactly as train.py renders them (prepare.prepare with
the CPU run's max_content_chars and max_length, read from titletune/config.py), through titletune.backends.hf
and training.build_trainer. Each runs `--warmup` steps, then `--steps` timed steps, in a fresh interpreter, so its
peak RSS, 4-bit patches, autocast and OpenMP state are its own. Rounds alternate the order (ABC..CBA), so a load that
drifts during the run falls on every configuration alike; the load average is recorded before and after each run.

Throughput counts non-pad tokens (TRL's `num_tokens`: attention_mask.sum(), or the flattened length when
padding-free), per wall second and per CPU second of the process (both threads). Model FLOPs utilisation divides the
model FLOPs of those tokens by the matmul peak this script measures before each round and at the end (torch.matmul
of 4096^2 matrices, same threads), bf16 for bf16 runs and fp32 for the fp32 run:

    FLOPs per step = sum over non-pad tokens of (4 * N_matmul + 6 * N_lora) + sum over sequences of 12 * L * d * len^2

N_matmul: the weights of every matmul of the base, lm_head included (134.5M for SmolLM2-135M; the tied embedding
counts once, as lm_head, since a lookup does no FLOPs). A frozen base costs 2N forward + 2N for the input gradient
and needs no weight gradient (not the 6N of full fine-tuning). Each LoRA parameter costs 6 (forward, input and weight
gradient). Attention (PaLM's convention, no causal halving): 4 * len * d per token and layer forward, twice that
backward; L = 30 layers, d = 9 heads x 64. Pad tokens count zero: they are work, but not useful work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (what it is, how it differs from `default`). Every run: fp32 master weights unless 4-bit, LoRA r=16,
# batch 4, no gradient checkpointing, bf16 autocast, prompt/completion rows with dynamic padding.
CONFIGS = {
    "padded_full": (
        "pad to max_length, loss on every token (the naive way)",
        {"rows": "messages", "pad_to_max": True},
    ),
    "default": ("dynamic padding, completion-only loss (our default)", {}),
    "padding_free": ("padding-free: the batch flattened into one row, no packing", {"padding_free": True}),
    "packing": ("packing=True (BFD, padding-free) into max_length rows", {"packing": True}),
    "fp32": ("default in fp32 (no bf16 autocast)", {"bf16": False}),
    "4bit": ("bnb nf4 4-bit base, bf16 compute", {"load_in_4bit": True}),
    "fp32_base": ("base weights in fp32 (LoRA fp32), bf16 autocast", {"fp32_base": True}),
    "grouped": ("default + group_by_length (batches of similar lengths: less padding)", {"group_by_length": True}),
    "compile": ("default + torch.compile (inductor, C++ kernels)", {"torch_compile": True}),
    "batch8": ("default at batch 8: the same rows in half the optimizer steps", {"batch_size": 8}),
    "grad_ckpt": ("default + gradient checkpointing", {"gradient_checkpointing": True}),
    # How idle OpenMP threads wait, and how many threads there are. Every other run uses WAIT below.
    "omp_spin": ("libgomp's default wait (spin 300,000 rounds, then sleep)", {"env": {"OMP_WAIT_POLICY": None}}),
    "omp_spin10k": (
        "a short spin: GOMP_SPINCOUNT=10000",
        {"env": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000"}},
    ),
    "1_thread": ("default on 1 thread", {"threads": 1}),
    # The two backends as train.py runs them on this CPU (bf16 only where it is native), on the same rows:
    # --backend auto on CPU follows this pair (backends.AUTO).
    "train_hf": ("hf backend (transformers + peft), train.py's CPU settings", {"backend": "hf", "bf16": "auto"}),
    "train_unsloth": (
        "unsloth backend (Unsloth's own CPU backend), train.py's CPU settings",
        {"backend": "unsloth", "bf16": "auto"},
    ),
}
# The OpenMP variants are left out by default: next to another job, one libgomp-spin run can take minutes.
DEFAULT_CONFIGS = ["padded_full", "default", "padding_free", "packing", "fp32", "4bit", "fp32_base", "grad_ckpt"]
# How torch's OpenMP threads wait between ops decided more than any other setting (bench/README.md): on a quiet
# machine libgomp's default spin was fastest (~1.35x PASSIVE), but next to another job on the 2 cores it collapsed
# (12-28 tok/s against PASSIVE's 106-215), and so did a short spin (GOMP_SPINCOUNT=10000). PASSIVE never collapsed,
# so every run and the matmul peaks use it unless its config says otherwise: the comparisons then hold up when
# others share the machine. libgomp reads it once, when torch loads it, so it is set in each child's environment.
WAIT = {"OMP_WAIT_POLICY": "PASSIVE"}
UNSET = ("GOMP_SPINCOUNT",)


def cpu_name() -> str:
    """Model name and the flags that decide CPU training speed here (bf16 is native only with AVX512-BF16 or AMX)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((set(line.split(":", 1)[1].split()) for line in info.splitlines() if line.startswith("flags")), set())
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({', '.join(wanted) or 'no AVX2'})"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def matmul_peak(
    dtype_name: str, threads: int, shape: tuple[int, int, int] = (4096, 4096, 4096), reps: int = 4
) -> dict:
    """Best of `reps` timings of (m x k) @ (k x n) matmuls: GFLOP/s per wall second and per CPU second of this process.
    Small shapes are repeated within a timing until it holds as many FLOPs as one 4096^3 matmul."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    m, k, n = shape
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    torch.matmul(a, b)  # warm-up: oneDNN picks and caches its kernel
    inner = max(1, 4096**3 // (m * k * n))
    flops = 2 * m * k * n * inner
    wall, cpu = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner):
            torch.matmul(a, b)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"gflops": flops / min(wall) / 1e9, "gflops_per_cpu_s": flops / min(cpu) / 1e9}


def peaks(threads: int) -> dict:
    """The two peaks MFU is taken against, and bf16 at one MLP matmul of a default training step (4 rows of ~112
    tokens, hidden 576 -> 1536), which is as large as the matmuls of this model get. On a CPU without native bf16
    (AVX2 only) the bf16 peaks are left out: emulated, one 4096^3 bf16 matmul takes minutes and nothing trains in bf16.
    """
    from titletune.machine import bf16_supported

    found = {"float32": matmul_peak("float32", threads)}
    if bf16_supported():
        found["bfloat16"] = matmul_peak("bfloat16", threads)
        found["bfloat16_mlp_shape"] = matmul_peak("bfloat16", threads, (448, 576, 1536))
    return found


def model_dims(model_dir: Path, lora_r: int) -> dict:
    """N_matmul, N_lora, layers and attention width from config.json (see the FLOPs formula in the docstring)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    d, ff, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or d // heads
    q, kv = heads * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = {  # (in, out) of each projection
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, ff),
        "up_proj": (d, ff),
        "down_proj": (ff, d),
    }
    per_layer = sum(i * o for i, o in shapes.values())
    lora_per_layer = sum(lora_r * (i + o) for name, (i, o) in shapes.items() if name in TARGETS)
    return {
        "n_matmul": layers * per_layer + vocab * d,
        "n_lora": layers * lora_per_layer,
        "layers": layers,
        "attn_width": q,
    }


def flops(dims: dict, tokens: int, sum_len_sq: int) -> float:
    per_token = 4 * dims["n_matmul"] + 6 * dims["n_lora"]
    return tokens * per_token + 12 * dims["layers"] * dims["attn_width"] * sum_len_sq


# ------------------------------------------------------------------------------------------- one configuration


def peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss carries over exec on Linux, so a child could report its parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Where a step's CPU time goes (--profile): torch.profiler's self CPU time per op, in these groups, first match wins.
PROFILE_GROUPS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "mkldnn")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("casts and copies", ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous")),
    ("softmax and loss", ("softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("optimizer", ("_foreach", "adam", "Optimizer")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu", "aten::neg", "aten::pow",
                     "aten::rsqrt", "aten::mean", "aten::cat", "aten::sum", "aten::where", "aten::fill_")),
)


def profile_shares(prof) -> dict[str, float]:
    """Each PROFILE_GROUPS group's share of the profiled self CPU time, plus "other"."""
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        group = next((g for g, keys in PROFILE_GROUPS if any(k in event.key for k in keys)), "other")
        totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {g: round(t / whole, 3) for g, t in sorted(totals.items(), key=lambda kv: -kv[1])}


def sequence_lengths(kwargs: dict) -> list[int]:
    """Lengths of the real sequences in one batch: from the attention mask, or from position_ids restarting at 0."""
    mask = kwargs.get("attention_mask")
    if mask is not None:
        return [int(n) for n in mask.sum(dim=1).tolist()]
    starts = (kwargs["position_ids"][0] == 0).nonzero().flatten().tolist()
    total = kwargs["position_ids"].shape[1]
    return [b - a for a, b in zip(starts, starts[1:] + [total], strict=True)]


def measure(name: str, data_dir: str, args: argparse.Namespace) -> dict:
    # As libgomp sees it when torch loads it, below; importing titletune later sets OMP_WAIT_POLICY if unset.
    omp_env = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}
    opts = CONFIGS[name][1]
    from titletune import backends, machine

    backend = backends.load_backend(opts.get("backend", "hf"))  # unsloth, if chosen, before trl and transformers
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import ModelConfig, SFTConfig, SFTTrainer

    from titletune import base_models, runs, training

    torch.set_num_threads(opts.get("threads", args.threads))
    rows = runs.read_split(data_dir, "train")
    model_args = ModelConfig(
        use_peft=True,
        lora_r=args.lora_r,
        lora_alpha=args.lora_r,
        lora_dropout=0.0,
        lora_target_modules=TARGETS,
        load_in_4bit=opts.get("load_in_4bit", False),
        bnb_4bit_quant_type="nf4",
        dtype="auto",  # as train.py (config.DEFAULTS); TRL's own default would be float32
    )
    steps = args.warmup + args.steps
    out = tempfile.mkdtemp(prefix="bench_train_")
    padding_free = opts.get("padding_free", False)
    training_args = SFTConfig(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=opts.get("batch_size", args.batch_size),
        learning_rate=5e-4,
        lr_scheduler_type="constant",
        bf16=machine.bf16_supported() if opts.get("bf16") == "auto" else opts.get("bf16", True),
        use_cpu=True,
        gradient_checkpointing=opts.get("gradient_checkpointing", False),
        torch_compile=opts.get("torch_compile", False),
        train_sampling_strategy="group_by_length" if opts.get("group_by_length") else "random",
        # TRL refuses padding_free without packing while max_length is set: it would not truncate. Every row here
        # is shorter than max_length (checked in main), so nothing is lost.
        max_length=None if padding_free else args.max_length,
        packing=opts.get("packing", False),
        padding_free=padding_free,
        pad_to_multiple_of=args.max_length if opts.get("pad_to_max") else None,
        completion_only_loss=False if opts.get("rows") == "messages" else None,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=42,
        dataloader_num_workers=0,
    )
    # As train.py: with bf16 autocast the CPU base is loaded in bf16, else in fp32. The LoRA weights stay fp32.
    bf16_base = training_args.bf16 and not opts.get("fp32_base")
    model, tokenizer = backend.load(
        str(base_models.embedded_hf_dir()), model_args, max_length=args.max_length, bf16=bf16_base
    )
    model = backend.add_lora(model, model_args, training_args)
    if opts.get("rows") == "messages":
        # The naive way: whole conversations as language-modelling rows, loss on every token (system prompt too).
        dataset = Dataset.from_list([{"messages": r["prompt"] + r["completion"]} for r in rows])
        trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
    else:
        dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
        trainer = training.build_trainer(model, tokenizer, dataset, None, training_args, Path(out))

    batches: list[dict] = []

    def count(module, fwd_args, kwargs):
        if module.training:
            lengths = sequence_lengths(kwargs)
            labels = kwargs.get("labels")
            batches.append(
                {
                    "tokens": sum(lengths),
                    "executed": int(kwargs["input_ids"].numel()),
                    "loss_tokens": int((labels != -100).sum()) if labels is not None else 0,
                    "sum_len_sq": sum(n * n for n in lengths),
                }
            )

    model.register_forward_pre_hook(count, with_kwargs=True)
    clock: dict[int, tuple[float, float]] = {}

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if args.profile else None

    class Clock(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kw):
            clock[0] = (time.perf_counter(), time.process_time())

        def on_step_end(self, targs, state, control, **kw):
            clock[state.global_step] = (time.perf_counter(), time.process_time())
            if profiler is not None and state.global_step == args.warmup:  # the timed steps, profiled
                profiler.__enter__()
            if profiler is not None and state.global_step == steps:
                profiler.__exit__(None, None, None)

    trainer.add_callback(Clock())
    load_before = load_average()
    trainer.train()
    load_after = load_average()

    timed = batches[args.warmup : steps]
    wall = clock[steps][0] - clock[args.warmup][0]
    cpu = clock[steps][1] - clock[args.warmup][1]
    logs = {r["step"]: r for r in trainer.state.log_history if "loss" in r}
    tokens = sum(b["tokens"] for b in timed)
    trl_tokens = logs[steps]["num_tokens"] - logs[args.warmup]["num_tokens"]
    dims = model_dims(base_models.embedded_hf_dir(), args.lora_r)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "config": name,
        "steps": len(timed),
        "tokens": tokens,
        "trl_num_tokens": trl_tokens,
        "executed": sum(b["executed"] for b in timed),
        "loss_tokens": sum(b["loss_tokens"] for b in timed),
        "flops": flops(dims, tokens, sum(b["sum_len_sq"] for b in timed)),
        "wall_s": wall,
        "cpu_s": cpu,
        "losses": [round(logs[s]["loss"], 4) for s in sorted(logs)],
        "step_wall_s": [round(clock[s][0] - clock[s - 1][0], 2) for s in range(1, steps + 1)],
        "step_cpu_s": [round(clock[s][1] - clock[s - 1][1], 2) for s in range(1, steps + 1)],
        "step_tokens": [b["tokens"] for b in batches],
        "step_executed": [b["executed"] for b in batches],
        "peak_rss_mb": peak_rss_mb(),
        "load": f"{load_before} -> {load_after}",
        "omp_env": omp_env,
        "threads": torch.get_num_threads(),
        "bf16": training_args.bf16,
        **({"profile": profile_shares(profiler)} if profiler is not None else {}),
    }


# ---------------------------------------------------------------------------------------------------- driver


def prepare_rows(args: argparse.Namespace) -> str:
    """Render the train split as train.py does (prepare.prepare), into a temp folder; returns it."""
    from titletune import prepare, prompts
    from titletune.config import DataArguments

    out = tempfile.mkdtemp(prefix="bench_train_data_")
    data_args = DataArguments(data=args.data, max_content_chars=args.max_content_chars)
    prepare.prepare(data_args, seed=42, out_dir=out, prompts=prompts.load(ROOT / "prompts" / "qa"))
    return out


def longest_row(data_dir: str) -> int:
    from transformers import AutoTokenizer

    from titletune import base_models, runs

    tokenizer = AutoTokenizer.from_pretrained(base_models.embedded_hf_dir())
    rows = runs.read_split(data_dir, "train")
    return max(len(tokenizer.apply_chat_template(r["prompt"] + r["completion"])["input_ids"]) for r in rows)


def run_child(name: str, data_dir: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--measure", name, "--data_dir", data_dir]
    for flag in ("steps", "warmup", "threads", "batch_size", "max_length", "lora_r"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    cmd += ["--profile"] if args.profile else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", **WAIT)
    for key in UNSET:
        env.pop(key, None)
    for key, value in CONFIGS[name][1].get("env", {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        return {"config": name, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_preset() -> dict:
    """The CPU run's settings: DEFAULTS over TRL's, and our own dataclass defaults."""
    import dataclasses

    from titletune.config import DEFAULTS, DataArguments

    return {**{f.name: f.default for f in dataclasses.fields(DataArguments)}, **DEFAULTS}


def summarise(runs: list[dict], measured: list[dict]) -> list[str]:
    """One row per configuration: medians over its runs, ratios against `default` and `padded_full`."""
    kinds = [k for k in ("bfloat16", "float32") if k in measured[0]]
    peak = {k: statistics.median(p[k]["gflops"] for p in measured) for k in kinds}
    peak_cpu = {k: statistics.median(p[k]["gflops_per_cpu_s"] for p in measured) for k in kinds}
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["config"], []).append(r)
    ok = {n: [r for r in rs if "error" not in r] for n, rs in by.items()}
    rate = {n: statistics.median(r["tokens"] / r["wall_s"] for r in rs) for n, rs in ok.items() if rs}
    rate_cpu = {n: statistics.median(r["tokens"] / r["cpu_s"] for r in rs) for n, rs in ok.items() if rs}
    lines = [
        "| config | runs | tok/s (wall) | tok per CPU-s | x default (wall / CPU) | x padded_full (wall / CPU) "
        "| executed / non-pad tokens | MFU wall | MFU CPU-time | peak RSS MB | loss step 1 -> last |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, rs in by.items():
        good = ok[name]
        if not good:
            lines.append(f"| {name} | 0 | failed: {rs[0]['error'][:100]} |||||||||")
            continue
        dtype = "bfloat16" if good[0].get("bf16", name != "fp32") else "float32"
        if dtype in peak:
            mfu = f"{statistics.median(r['flops'] / r['wall_s'] / 1e9 / peak[dtype] for r in good):.1%}"
            mfu_cpu = f"{statistics.median(r['flops'] / r['cpu_s'] / 1e9 / peak_cpu[dtype] for r in good):.1%}"
        else:
            mfu = mfu_cpu = "n/a"

        def ratio(base: str) -> str:
            if base not in rate:
                return "n/a"
            return f"{rate[name] / rate[base]:.2f} / {rate_cpu[name] / rate_cpu[base]:.2f}"

        first = good[0]
        lines.append(
            f"| {name} | {len(good)} | {rate[name]:.0f} | {rate_cpu[name]:.0f} | {ratio('default')} | "
            f"{ratio('padded_full')} | {first['executed'] / first['tokens']:.2f} | {mfu} | {mfu_cpu} | "
            f"{max(r['peak_rss_mb'] for r in good):,.0f} | {first['losses'][0]:.3f} -> {first['losses'][-1]:.3f} |"
        )
    return lines


def per_run(runs: list[dict]) -> list[str]:
    """Every run in the order it ran, with the load average (1, 5, 15 min) before and after it."""
    lines = ["| # | config | tok/s (wall) | tok per CPU-s | load before -> after |", "|---:|---|---:|---:|---|"]
    for i, r in enumerate(runs, 1):
        if "error" in r:
            lines.append(f"| {i} | {r['config']} | failed | | |")
        else:
            lines.append(
                f"| {i} | {r['config']} | {r['tokens'] / r['wall_s']:.0f} | {r['tokens'] / r['cpu_s']:.0f} | "
                f"{r['load']} |"
            )
    return lines


def run_rounds(names: list[str], data_dir: str, args: argparse.Namespace, measured: list, runs: list) -> None:
    """The matmul peaks, then every config in order, then in reverse order, ...; the peaks once more at the end."""
    for k in range(args.rounds + 1):
        measured.append(peaks(args.threads))
        print(f"peak GFLOP/s: {json.dumps(measured[-1])}  load {load_average()}", file=sys.stderr)
        if k == args.rounds:
            break
        for name in names if k % 2 == 0 else names[::-1]:
            runs.append(run_child(name, data_dir, args))
            r = runs[-1]
            brief = (
                r.get("error") or f"{r['tokens'] / r['wall_s']:.0f} tok/s, {r['tokens'] / r['cpu_s']:.0f} tok/CPU-s"
            )
            print(f"round {k + 1} {name}: {brief}  (load {r.get('load', load_average())})", file=sys.stderr)


def main() -> None:
    preset = cpu_preset()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma list of: {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (8-10 for the README)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, oneDNN kernels)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per config; odd rounds go in reverse order")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=preset["per_device_train_batch_size"])
    parser.add_argument("--max_length", type=int, default=preset["max_length"])
    parser.add_argument("--max_content_chars", type=int, default=preset["max_content_chars"])
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--data", default=str(ROOT / "data" / "sample_trn.json"))
    parser.add_argument("--json", help="also write every run and peak measurement here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the timed steps (torch.profiler) and print where the CPU time goes; slows them, so read the "
        "speed from a run without it",
    )
    parser.add_argument("--measure", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--data_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        print(json.dumps(measure(args.measure, args.data_dir, args)))
        return
    if "torch" in sys.modules:
        sys.exit("bench_train: torch was imported before OMP_WAIT_POLICY could be set")
    os.environ.update(WAIT)  # for the matmul peaks measured in this process
    for key in UNSET:
        os.environ.pop(key, None)

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    started = time.perf_counter()
    print(f"load average before: {load_average()}", file=sys.stderr)
    data_dir = prepare_rows(args)
    longest = longest_row(data_dir)
    if longest > args.max_length and "padding_free" in names:
        sys.exit(
            f"padding_free runs without truncation, but a row has {longest} > --max_length {args.max_length} tokens"
        )
    measured, runs = [], []
    try:
        run_rounds(names, data_dir, args, measured, runs)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)

    from titletune import base_models

    dims = model_dims(base_models.embedded_hf_dir(), args.lora_r)
    gf = {key: [round(p[key]["gflops"]) for p in measured] for key in measured[0]}
    print(
        f"\nSmolLM2-135M-Instruct, LoRA r={args.lora_r} on {len(TARGETS)} projections, batch {args.batch_size}, "
        f"max_length {args.max_length}, {args.warmup} warm-up + {args.steps} timed steps, {args.rounds} round(s), "
        f"{args.threads} threads; longest row {longest} tokens; Python {platform.python_version()}; CPU {cpu_name()}"
    )
    print(
        f"N_matmul {dims['n_matmul'] / 1e6:.1f}M, N_lora {dims['n_lora'] / 1e6:.2f}M -> "
        f"{(4 * dims['n_matmul'] + 6 * dims['n_lora']) / 1e9:.3f} GFLOP per token + attention"
    )
    names_gf = {"bfloat16": "bf16 4096^3", "float32": "fp32 4096^3", "bfloat16_mlp_shape": "bf16 448x576x1536"}
    print(
        f"matmul GFLOP/s ({args.threads} threads, best of 4), before each round and at the end: "
        + ", ".join(f"{names_gf[k]} {v}" for k, v in gf.items())
    )
    print(f"load average at the end: {load_average()}; wall {time.perf_counter() - started:.0f} s\n")
    print("\n".join(summarise(runs, measured)))
    print()
    print("\n".join(per_run(runs)))
    for r in runs:
        if r.get("profile"):
            print(f"profile {r['config']}: " + ", ".join(f"{g} {v:.0%}" for g, v in r["profile"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "peaks": measured, "dims": dims}, indent=1))


if __name__ == "__main__":
    main()
