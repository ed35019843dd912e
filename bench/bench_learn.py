"""Does the tuned model learn the catalogue? Trains train.py variants on real records and measures recall.

    python bench/bench_learn.py --data <300 real trn.json records> --variants default,epochs8
    python bench/bench_learn.py --data <file> --list          # the variants and their train.py flags

Each variant is a real `train.py` run (the CPU default plus the variant's flags) on every product of --data, in a
fresh folder, with no export and no evaluation after training. Then, in this process, the run is scored on up to
--samples products it was trained on (seen) and on its own test split (held-out): ROUGE-L F1 of the tuned answers
with a 95% bootstrap interval (titletune.metrics), greedy, as the report decodes. The base model's answers to the same
questions are scored once per question set and reused. Every row is kept, failures included, in --results (JSONL,
appended): the variant, its flags, the train loss first -> last, the training seconds (TRL's train_runtime), the
scores, the CPU and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# name -> train.py flags laid over the CPU default. One factor at a time; combinations are named for their parts.
VARIANTS = {
    "default": [],
    "steps320": ["--max_steps", "320"],
    "steps480": ["--max_steps", "480"],
    "lr1e-3": ["--learning_rate", "1e-3"],
    "lr2e-4": ["--learning_rate", "2e-4"],
    "r64": ["--lora_r", "64", "--lora_alpha", "64"],
    "cap200": ["--max_content_chars", "200"],
}


def train(name: str, flags: list[str], data: str, folder: Path) -> dict:
    out = folder / name
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", data, "--max_samples", "all", "--output_dir", str(out)]
    cmd += ["--eval_samples", "0", "--merge", "false", "--gguf", "none", "--overwrite", *flags]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    row = {"wall_s": round(time.perf_counter() - started, 1), "rc": proc.returncode, "run": str(out)}
    if proc.returncode:
        row["error"] = proc.stderr[-2000:]
        return row
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in logs if "loss" in r]
    row.update(
        loss_first=round(losses[0], 3),
        loss_last=round(losses[-1], 3),
        train_s=round(next((r["train_runtime"] for r in logs if "train_runtime" in r), 0.0), 1),
        steps=max(r["step"] for r in logs),
    )
    return row


def score(run_dir: str, samples: int, base_cache: dict) -> dict:
    from titletune import evaluate, generate, metrics, prompts, runs

    run = runs.load(run_dir)
    settings = evaluate.EvalSettings(samples=samples).for_run(run)
    pops = evaluate.sample_populations(run, run.split("train"), samples, settings.seed, None)
    engine = generate.load_engine(run, "transformers")
    out = {}
    for pop, products in pops.items():
        rows = [
            prompts.render(run.prompts, p["title"], p["content"], key=str(p["id"]), seed=run.seed) for p in products
        ]
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
    parser.add_argument("--keep", help="keep the runs in this folder (default: a temporary one)")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    args = parser.parse_args()
    if args.list:
        for name, flags in VARIANTS.items():
            print(f"{name:12} {' '.join(flags) or '(the CPU default)'}")
        return
    if not args.data:
        parser.error("--data is required: a trn-format file of real records")
    from bench_rag import cpu_name

    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; --list shows them")
    base_cache: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_learn_") as tmp:
        folder = Path(args.keep or tmp)
        for name in args.variants.split(","):
            row = {"variant": name, "flags": VARIANTS[name], "cpu": cpu_name(), "load_before": os.getloadavg()[0]}
            row.update(train(name, VARIANTS[name], args.data, folder))
            if not row["rc"]:
                row.update(score(row["run"], args.samples, base_cache))
            row["load_after"] = os.getloadavg()[0]
            print(json.dumps(row), flush=True)
            with open(args.results, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
