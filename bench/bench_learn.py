"""Does the tuned model learn the catalogue? Trains train.py variants on real records and measures recall.

    python bench/bench_learn.py --data <300 real trn.json records> --variants default,p6
    python bench/bench_learn.py --data <file> --list          # the variants and their train.py flags
    python bench/bench_learn.py --score outputs/<run>         # score a finished run the same way

Each variant is a real `train.py` run (the CPU default plus the variant's flags) on every product of --data, in a
fresh folder, with no export and no evaluation after training. `fixed` trains on a one-line copy of the prompt set
(every product asked the same way). `fullft*` is full fine-tuning, the upper bound: train.py prepares the data, then
this script trains every weight with the same SFTTrainer code (training.build_trainer) and saves merged/. Then, in
this process, the run is scored on up to --samples products it was trained on (seen), on the same products asked in a
phrasing training never used (seen_new_phrasing, heldout.txt), and on its own test split (held-out): ROUGE-L F1 of
the tuned answers with a 95% bootstrap interval (titletune.metrics), greedy, as the report decodes. The base model's
answers to the same questions are scored once per question set and reused. Every row is kept, failures included, in --results (JSONL,
appended): the variant, its flags, the train loss first -> last, the training seconds (TRL's train_runtime), the
scores, the CPU and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# name -> train.py flags laid over the CPU default. One factor at a time; combinations are named for their parts.
# The earlier default: 160 steps at lr 5e-4, one phrasing per product.
OLD = ["--max_steps", "160", "--passes", "1", "--learning_rate", "5e-4"]
VARIANTS = {
    "default": [],
    "old_default": OLD,
    "p1_steps480": ["--max_steps", "480", "--passes", "1"],
    "p4": ["--passes", "4"],
    "p6": ["--passes", "6"],
    "p8": ["--passes", "8"],
    "p10": ["--passes", "10"],
    "lr5e-4": ["--learning_rate", "5e-4"],
    "lr1e-3": ["--learning_rate", "1e-3"],
    "lr4e-4": ["--learning_rate", "4e-4"],  # GPU presets: against their 2e-4
    "lr2e-3": ["--learning_rate", "2e-3"],
    "lr3e-3": ["--learning_rate", "3e-3"],
    "fixed": ["--prompts", "{fixed}"],  # one phrasing for every product and pass
    "r64": ["--lora_r", "64", "--lora_alpha", "64"],
    "r64_a128": ["--lora_r", "64", "--lora_alpha", "128"],
    "attn_only": ["--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj"],
    "embed": ["--lora_modules_to_save", "embed_tokens"],  # SmolLM2 ties lm_head to it: both train
    "cap200": ["--max_content_chars", "200"],
    "p4_lr3e-3": ["--passes", "4", "--learning_rate", "3e-3"],
    "p4_lr1e-3": ["--passes", "4", "--learning_rate", "1e-3"],
    "p5_lr3e-3": ["--passes", "5", "--learning_rate", "3e-3"],
    "p6_lr3e-3": ["--passes", "6", "--learning_rate", "3e-3"],
    "p7_lr3e-3": ["--passes", "7", "--learning_rate", "3e-3"],
    "p8_lr3e-3": ["--passes", "8", "--learning_rate", "3e-3"],
    "p6_lr4e-3": ["--passes", "6", "--learning_rate", "4e-3"],
    "p4_lr3e-3_fixed": ["--passes", "4", "--learning_rate", "3e-3", "--prompts", "{fixed}"],
    "p4_lr3e-3_grouped": ["--passes", "4", "--learning_rate", "3e-3", "--train_sampling_strategy", "group_by_length"],
    "batch8": ["--per_device_train_batch_size", "8"],
    "batch2": ["--per_device_train_batch_size", "2"],
    "unsloth": ["--backend", "unsloth"],
    "fullft_lr1e-4": ["--learning_rate", "1e-4"],
    "fullft_lr3e-5": ["--learning_rate", "3e-5"],
}
FULL_FT = "fullft"  # variants named fullft* train every weight (see full_ft)


def command(name: str, flags: list[str], data: str, folder: Path, resume: bool = False) -> list[str]:
    """The train.py command of a variant: every product of `data`, no export and no evaluation after training.
    `resume`: continue folder/name's run from its newest checkpoint (--resume) in place of starting over."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", data, "--max_samples", "all"]
    cmd += ["--output_dir", str(folder / name), "--eval_samples", "0", "--merge", "false", "--gguf", "none"]
    return [*cmd, "--resume" if resume else "--overwrite", *flags]


def train(name: str, flags: list[str], data: str, folder: Path, resume: bool = False) -> dict:
    """Train one variant into folder/name. `resume`: continue that folder's run from its newest checkpoint
    (train.py --resume) in place of starting over; full fine-tuning always starts over."""
    out = folder / name
    full_ft = name.startswith(FULL_FT)
    cmd = command(name, flags, data, folder, resume=resume and not full_ft)
    started = time.perf_counter()
    if full_ft:
        proc = _run([*cmd, "--prepare_only"])
        if not proc.returncode:
            argv = [a for a in cmd[2:] if a != "--overwrite"] + ["--save_steps", "1000000"]
            proc = _run([sys.executable, __file__, "--full-ft", json.dumps(argv)])
    else:
        proc = _run(cmd)
    row = {"wall_s": round(time.perf_counter() - started, 1), "rc": proc.returncode, "run": str(out)}
    if proc.returncode:
        row["error"] = proc.stderr[-2000:]
        return row
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in logs if "loss" in r]
    row.update(
        loss_first=round(losses[0], 3),
        loss_last=round(losses[-1], 3),
        # every stretch of a run stopped and resumed logs its own runtime (one stopped by SIGKILL logs none)
        train_s=round(sum(r["train_runtime"] for r in logs if "train_runtime" in r), 1),
        steps=max(r["step"] for r in logs),
    )
    return row


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run a training command. On Ctrl-C the child, in the same process group, saves a checkpoint and exits 130:
    wait for it (subprocess.run would kill it a quarter second later), then stop."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate()
    except KeyboardInterrupt:
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def full_ft(argv: list[str]) -> None:
    """Full fine-tuning of the run train.py prepared (argv: its flags): every weight trains, with the same data,
    passes, SFTTrainer and settings as a LoRA run; the model is saved as the run's merged/."""
    import train as entry
    from titletune import prompts, training, trainset
    from titletune.backends import hf

    script_args, model_args, data_args, _, training_args = entry.parse(argv).groups
    run_dir = Path(training_args.output_dir)
    from titletune import base_models

    # fp32 weights under bf16 autocast (training_args.bf16): mixed precision, as full fine-tuning is usually run
    model, tokenizer = hf.load(base_models.resolve(model_args.model_name_or_path), model_args, bf16=False)
    prompt_set = prompts.load(run_dir / "prompts")
    train_ds, _ = trainset.load_datasets(run_dir, prompt_set, data_args.passes, training_args.seed)
    trainer = training.build_trainer(model, tokenizer, train_ds, None, training_args, run_dir)
    outcome = training.train(trainer, run_dir, False)
    model.save_pretrained(run_dir / "merged", safe_serialization=True)
    tokenizer.save_pretrained(run_dir / "merged")
    print(json.dumps({"steps": outcome.steps}))


def score(run_dir: str, samples: int, base_cache: dict) -> dict:
    from titletune import engines, evaluate, metrics, prompts, runs

    run = runs.load(run_dir)
    settings = evaluate.EvalSettings(samples=samples).for_run(run)
    pops = evaluate.sample_populations(run, run.split("train"), samples, settings.seed, None)
    pops["seen_new_phrasing"] = pops["seen"]
    merged = not (run.adapter / "adapter_config.json").is_file()  # full fine-tuning saved merged/ only
    engine = engines.load_engine(run, "transformers", options=engines.EngineOptions(use_merged=merged))
    out = {}
    for pop, products in pops.items():
        rows = [
            prompts.render(run.prompts, p["title"], p["content"], key=str(p["id"]), seed=run.seed) for p in products
        ]
        if pop == "seen_new_phrasing":
            held = prompts.load(prompts.DEFAULT_SET)  # the run's own set may be the one-line `fixed` one
            for r, p in zip(rows, products, strict=True):
                asked = prompts.held_out_question(held, p["title"], str(p["id"]), run.seed)
                r["prompt"] = prompts.messages(run.prompts.system, asked)
        questions = [r["prompt"] for r in rows]
        refs = [r["completion"][0]["content"] for r in rows]
        titles = [p["title"] for p in products]
        key = json.dumps([pop, [q[-1]["content"] for q in questions], refs])  # same questions, same answers
        if key not in base_cache:
            answers = engine.generate(questions, "base", settings.sampling, progress=True)
            base_cache[key] = metrics.score(answers, refs, titles)[0]["rougeL"]
        tuned = engine.generate(questions, "tuned", settings.sampling, progress=True)
        summary, _ = metrics.score(tuned, refs, titles)
        out[pop] = {"base": base_cache[key], "tuned": summary["rougeL"], "example": tuned[0][:200]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="trn-format file of real records (required unless --list)")
    parser.add_argument("--variants", default="default", help=f"comma list of: {', '.join(VARIANTS)}")
    parser.add_argument("--samples", type=int, default=50, help="seen products scored (held-out: the test split)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "learn_results.jsonl"), help="rows appended here")
    parser.add_argument(
        "--flags",
        help='train.py flags added to every variant (they come last, so they win), e.g. "--learning_rate 1e-3" or '
        '"--config configs/llama3_2_3b_qlora.yaml --max-samples 2000" for a GPU preset on a slice',
    )
    parser.add_argument("--keep", help="keep the runs in this folder (default: a temporary one)")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--score", help="score this finished run folder (e.g. a default train.py run) and exit")
    parser.add_argument("--full-ft", help=argparse.SUPPRESS)  # internal: full_ft() in a fresh process
    args = parser.parse_args()
    from titletune import logs

    logs.setup(logging.WARNING)  # train.py's quiet log: the libraries' import-time noise off, our bars kept
    if args.full_ft:
        return full_ft(json.loads(args.full_ft))
    if args.list:
        for name, flags in VARIANTS.items():
            print(f"{name:12} {' '.join(flags) or '(the CPU default)'}")
        return
    if args.score:  # a run trained elsewhere (train.py as a user runs it): the same scores, one row
        from bench_rag import cpu_name

        row = {"variant": "scored", "run": args.score, "cpu": cpu_name(), "load_before": os.getloadavg()[0]}
        row.update(score(args.score, args.samples, {}))
        row["load_after"] = os.getloadavg()[0]
        print(json.dumps(row), flush=True)
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        return
    if not args.data:
        parser.error("--data is required: a trn-format file of real records")
    from bench_rag import cpu_name

    extra = args.flags.split() if args.flags else []
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; --list shows them")
    base_cache: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_learn_") as tmp:
        folder = Path(args.keep or tmp)
        fixed = Path(tmp) / "fixed_prompts"
        shutil.copytree(ROOT / "prompts" / "qa", fixed)
        first = (fixed / "user.txt").read_text(encoding="utf-8").splitlines()[0]
        (fixed / "user.txt").write_text(first + "\n", encoding="utf-8")
        for name in args.variants.split(","):
            flags = [f.replace("{fixed}", str(fixed)) for f in VARIANTS[name]] + extra
            row = {"variant": name, "flags": flags, "cpu": cpu_name(), "load_before": os.getloadavg()[0]}
            row.update(train(name, flags, args.data, folder))
            if not row["rc"]:
                row.update(score(row["run"], args.samples, base_cache))
            row["load_after"] = os.getloadavg()[0]
            print(json.dumps(row), flush=True)
            with open(args.results, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
