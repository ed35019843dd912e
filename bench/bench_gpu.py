"""GPU training throughput and peak VRAM of the unsloth and hf backends, on the same data and settings (CUDA only).

    python bench/bench_gpu.py                                                    # Llama 3.2 1B 4-bit, 30 steps each
    python bench/bench_gpu.py --model unsloth/Llama-3.2-3B-Instruct-bnb-4bit --steps 40
    python bench/bench_gpu.py --data data/trn.json --max_samples 2000 --backends unsloth,hf --rounds 2
    python bench/bench_gpu.py --smoke_cpu                                        # plumbing check without a GPU

Each backend trains in its own subprocess, through the same code as train.py: titletune.backends.<name>.load and
add_lora, then training.build_trainer (TRL's SFTTrainer on prompt/completion rows from prepare.prepare). The unsloth
child imports unsloth before trl, transformers and peft (backends.load_backend does it first); the hf child never
imports it, because unsloth patches transformers for the whole process. Both load the base in 4-bit (bnb nf4), LoRA
r=16 on all 7 projections, with the 3B preset's settings (configs/llama3_2_3b_qlora.yaml over titletune/config.py's
defaults): batch 4 x 4 accumulation, max_length 1024, adamw_8bit, gradient checkpointing on (hf: torch's; unsloth: its
own "unsloth" mode, as in train.py); bf16 (fp16 where the GPU lacks it). `--warmup` untimed steps, then `--steps` timed
ones. `--model` takes a hub id or a local folder: bench/gpu_check.py passes random-weight models of the presets' shapes
(speed and memory do not depend on the weights).

Reported: non-pad tokens trained per second (TRL's num_tokens), seconds per step, and peak VRAM:
torch.cuda.max_memory_allocated (tensors) and max_memory_reserved (what the caching allocator held, closer to what
nvidia-smi shows), each over the whole run, model load included, plus the memory right after loading.
Without CUDA it exits with status 2 and says so; nothing is measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BACKENDS = ("unsloth", "hf")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gpu_preset() -> dict:
    """The 3B preset laid over the defaults, as train.py lays it (the preset holds only what it changes)."""
    import yaml

    from titletune.config import DEFAULTS

    return {**DEFAULTS, **yaml.safe_load((ROOT / "configs" / "llama3_2_3b_qlora.yaml").read_text())}


# ------------------------------------------------------------------------------------------------ one backend


def measure(backend_name: str, data_dir: str, args: argparse.Namespace) -> dict:
    """Runs in a fresh interpreter. For unsloth, nothing of trl/transformers/peft may be imported before this."""
    from titletune import backends

    backend = backends.load_backend(backend_name)  # imports unsloth first when it is the one

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import ModelConfig, SFTConfig

    from titletune import base_models, runs, training

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    bf16 = cuda and torch.cuda.is_bf16_supported() or not cuda
    model_args = ModelConfig(
        model_name_or_path=args.model,
        use_peft=True,
        lora_r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_target_modules=TARGETS,
        load_in_4bit=not args.smoke_cpu,
        bnb_4bit_quant_type="nf4",
        dtype="auto",  # as train.py (config.DEFAULTS); TRL's own default would be float32
    )
    steps = args.warmup + args.steps
    out = tempfile.mkdtemp(prefix="bench_gpu_")
    training_args = SFTConfig(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        optim=args.optim if cuda else "adamw_torch",
        bf16=bf16,
        fp16=cuda and not bf16,
        use_cpu=not cuda,
        gradient_checkpointing=cuda and args.gradient_checkpointing,
        max_length=args.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=42,
    )
    base = base_models.resolve(args.model)
    started = time.perf_counter()
    model, tokenizer = backend.load(base, model_args, False, args.max_length)
    model = backend.add_lora(model, model_args, training_args)
    if backend_name == "unsloth":
        training_args.gradient_checkpointing = False  # add_lora(use_gradient_checkpointing="unsloth") did it
    load_s = time.perf_counter() - started
    after_load = torch.cuda.memory_allocated() if cuda else 0
    rows = runs.read_split(data_dir, "train")
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    trainer = training.build_trainer(model, tokenizer, dataset, None, training_args, Path(out))

    clock: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if state.global_step in (args.warmup, steps):
                if cuda:
                    torch.cuda.synchronize()
                clock[state.global_step] = time.perf_counter()

    trainer.add_callback(Clock())
    trainer.train()
    logs = {r["step"]: r for r in trainer.state.log_history if "loss" in r}
    tokens = logs[steps]["num_tokens"] - logs[args.warmup]["num_tokens"]
    seconds = clock[steps] - clock[args.warmup]
    trainable, total = model.get_nb_trainable_parameters()
    shutil.rmtree(out, ignore_errors=True)
    return {
        "backend": backend_name,
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke check)",
        "model": args.model,
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "step_s": seconds / args.steps,
        "load_s": load_s,
        "after_load_gb": after_load / 2**30,
        "peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "trainable_m": trainable / 1e6,
        "total_m": total / 1e6,
        "losses": [round(logs[s]["loss"], 4) for s in sorted(logs)],
        "versions": versions(),
    }


def versions() -> dict:
    import importlib.metadata

    found = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "unsloth_zoo"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


# ---------------------------------------------------------------------------------------------------- driver


def prepare_rows(args: argparse.Namespace) -> str:
    from titletune import prepare, prompts
    from titletune.config import DataArguments

    out = tempfile.mkdtemp(prefix="bench_gpu_data_")
    data_args = DataArguments(data=args.data, max_samples=args.max_samples, max_content_chars=args.max_content_chars)
    prepare.prepare(data_args, seed=42, out_dir=out, prompts=prompts.load(ROOT / "prompts" / "qa"))
    return out


def run_child(backend: str, data_dir: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--measure", backend, "--data_dir", data_dir]
    cmd += ["--gradient_checkpointing", str(args.gradient_checkpointing).lower()]
    for flag in ("model", "steps", "warmup", "batch_size", "gradient_accumulation_steps", "max_length", "optim"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    if args.smoke_cpu:
        cmd.append("--smoke_cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["failed"]
        return {"backend": backend, "error": lines[-1], "stderr_tail": lines[-20:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(runs: list[dict]) -> list[str]:
    def gb(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["backend"], []).append(r)
    rate = {
        b: statistics.median(r["tok_s"] for r in rs if "error" not in r)
        for b, rs in by.items()
        if any("error" not in r for r in rs)
    }
    lines = [
        "| backend | runs | tok/s | x hf | s/step | peak allocated GB | peak reserved GB | after load GB | "
        "load s | loss first -> last |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for backend, rs in by.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            lines.append(f"| {backend} | 0 | failed: {rs[0]['error'][:120]} ||||||||")
            continue
        x = f"{rate[backend] / rate['hf']:.2f}" if "hf" in rate else "n/a"
        peak = max(ok, key=lambda r: r["peak_allocated_gb"] or 0)
        lines.append(
            f"| {backend} | {len(ok)} | {rate[backend]:.0f} | {x} | "
            f"{statistics.median(r['step_s'] for r in ok):.2f} | "
            f"{gb(peak['peak_allocated_gb'])} | {gb(peak['peak_reserved_gb'])} | {ok[0]['after_load_gb']:.2f} | "
            f"{ok[0]['load_s']:.0f} | {ok[0]['losses'][0]:.3f} -> {ok[0]['losses'][-1]:.3f} |"
        )
    return lines


def main() -> None:
    preset = gpu_preset()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma list of: unsloth, hf")
    parser.add_argument("--model", default="unsloth/Llama-3.2-1B-Instruct-bnb-4bit", help="hub id or folder")
    parser.add_argument("--data", default=str(ROOT / "data" / "sample_trn.json"))
    parser.add_argument("--max_samples", default="all")
    parser.add_argument("--max_content_chars", type=int, default=preset["max_content_chars"])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (CUDA kernels, allocator)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per backend; odd rounds go in reverse order")
    parser.add_argument("--batch_size", type=int, default=preset["per_device_train_batch_size"])
    parser.add_argument(
        "--gradient_accumulation_steps", type=int, default=preset["gradient_accumulation_steps"], help="per step"
    )
    parser.add_argument("--max_length", type=int, default=preset["max_length"])
    parser.add_argument("--optim", default=preset["optim"], help="on CUDA; the CPU smoke check uses adamw_torch")
    parser.add_argument(
        "--gradient_checkpointing",
        type=lambda v: v.lower() in ("true", "1", "yes"),
        default=bool(preset["gradient_checkpointing"]),
        help="hf: torch's; unsloth always uses its own offloaded one, as train.py does",
    )
    parser.add_argument("--json", help="also write every run here")
    parser.add_argument(
        "--smoke_cpu",
        action="store_true",
        help="check the plumbing on CPU: hf backend, the embedded model, 16-bit, 2 steps; no VRAM",
    )
    parser.add_argument("--measure", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--data_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        print(json.dumps(measure(args.measure, args.data_dir, args)))
        return

    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    if bad := [n for n in names if n not in BACKENDS]:
        parser.error(f"--backends: unknown {', '.join(bad)}; choose from {', '.join(BACKENDS)}")
    if args.smoke_cpu:
        names, args.model, args.steps, args.warmup, args.max_length = ["hf"], "embedded", 1, 1, 256
        args.gradient_accumulation_steps = 1
    else:
        import torch  # only torch here: the unsloth child must import unsloth before transformers

        if not torch.cuda.is_available():
            print(
                "bench_gpu: no CUDA GPU is visible, so there is nothing to measure (this benchmark compares the "
                "unsloth and hf backends' tokens/s and VRAM on an NVIDIA GPU). Run it on a CUDA machine, or pass "
                "--smoke_cpu to check the plumbing here.",
                file=sys.stderr,
            )
            sys.exit(2)
    data_dir = prepare_rows(args)
    runs = []
    try:
        for k in range(args.rounds):
            for name in names if k % 2 == 0 else names[::-1]:
                runs.append(run_child(name, data_dir, args))
                r = runs[-1]
                peak = "n/a" if r.get("peak_allocated_gb") is None else f"{r['peak_allocated_gb']:.2f} GB"
                brief = r.get("error") or f"{r['tok_s']:.0f} tok/s, peak VRAM {peak}"
                print(f"round {k + 1} {name}: {brief}", file=sys.stderr)
                if "error" in r:
                    print("\n".join(r["stderr_tail"]), file=sys.stderr)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    ok = next((r for r in runs if "error" not in r), {})
    base = "16-bit base (smoke check)" if args.smoke_cpu else "4-bit nf4 base"
    print(
        f"\n{args.model} on {ok.get('device', '?')}: {base}, LoRA r=16 on 7 projections, batch "
        f"{args.batch_size} x {args.gradient_accumulation_steps} accumulation, max_length {args.max_length}, "
        f"{args.optim}, {args.warmup} warm-up + {args.steps} timed steps, "
        f"{args.rounds} round(s); {json.dumps(ok.get('versions', {}))}\n"
    )
    print("\n".join(table(runs)))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    if any("error" in r for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
