"""How many products can a tuned model hold? Trains train.py at one LoRA rank (or every weight) per row, on catalogues
of growing size, and scores the recall of what it trained.

    python bench/bench_capacity.py --dry-run                      # the plan: rows, commands, estimated steps
    python bench/bench_capacity.py                                # the default sweep; rows already done are skipped
    python bench/bench_capacity.py --rows real300:r1,real300:r2   # chosen rows (--redo: measure them again)
    python bench/bench_capacity.py --fit --predict 24.3e6,90000,130,4   # the capacity law, its uncertainty, a forecast
    python bench/bench_capacity.py --table                        # the rows as bench/README.md's table

A row is `catalogue:rN` (LoRA rank N, alpha N) or `catalogue:full`. Catalogues: `real300`, the 300 real records of
--real; `genN`, N products from data/make_sample.py's generator (seed 1, distinct titles, no trap rows; nested:
gen300 is the first 300 products of gen1000). Each row is train.py with the CPU default recipe (every product of the
catalogue, the default split, passes, learning rate and batch) and that rank, run by bench_learn.py's `train`; `full`
cannot go through train.py (it trains LoRA only, and refuses `--use_peft false`), so it takes
bench_learn.py's full fine-tuning path (train.py prepares the data, the same SFTTrainer trains every weight) at lr
1e-4 (FULL_LR). Then the row is scored by bench_learn.py's `score`: ROUGE-L F1 of greedy answers on --samples trained
products, asked as trained and in a phrasing training never used, and on the held-out split, each with its 95%
bootstrap interval. It records the trainable parameters (train.py's capacity.json; merged/ for `full`), the train
products and their mean answer tokens under the base model's tokenizer (the whole split), the capacity ratio and what
the law in config.py predicted, the train loss, time and steps, the CPU and the load average before and after.

Every finished row, failures too (with the error), is appended as one JSON line to --results. A row that finished is
skipped unless --redo; a failed one is tried again from the start. Rows copied in from other studies (another
`measured_by`) count for --fit, never as done. Each run folder goes under --work and is removed after scoring unless
--keep. A sweep stopped in a row (Ctrl-C, or SIGTERM to its process group) leaves no row: train.py saves a checkpoint,
the folder stays, and the same command resumes that row from its newest checkpoint (train.py --resume; --redo starts
it over). Its train time then sums the runtime of each stretch.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "data"))

from titletune import capacity, config, logs, resume  # noqa: E402

RESULTS = ROOT / "bench" / "capacity_results.jsonl"
REAL = ROOT.parent / "shared" / "data" / "trn_real_head300.jsonl"  # the 300 real head records, where tests find them
ME = "bench_capacity"
RANKS = ("r1", "r2", "r4", "r8", "r16", "r64")
DEFAULT_ROWS = [f"real300:{r}" for r in RANKS] + ["real300:full"]
DEFAULT_ROWS += [f"gen{n}:{r}" for n in (300, 1000, 3000) for r in ("r16", "r64")]
GEN_SEED = 1
# Full fine-tuning: 3e-3, the LoRA rate, is far above what training every weight stands; 1e-4 is the full-FT rate
# bench_learn.py measured (bench/README.md, Learning the catalogue).
FULL_LR = "1e-4"
BOOTSTRAP = 1000


def parse_row(row: str) -> tuple[str, int | None]:
    """'real300:r16' -> ('real300', 16); 'gen1000:full' -> ('gen1000', None)."""
    catalogue, _, rank = row.partition(":")
    if catalogue != "real300" and not (catalogue.startswith("gen") and catalogue[3:].isdigit()):
        raise ValueError(f"catalogue must be real300 or genN, got {catalogue!r} in {row!r}")
    if rank == "full":
        return catalogue, None
    if not (rank.startswith("r") and rank[1:].isdigit() and int(rank[1:]) > 0):
        raise ValueError(f"rank must be rN (N >= 1) or full, got {rank!r} in {row!r}")
    return catalogue, int(rank[1:])


def name_and_flags(row: str) -> tuple[str, list[str]]:
    """bench_learn.train's variant name (fullft* trains every weight) and the flags over the CPU default."""
    catalogue, rank = parse_row(row)
    if rank is None:
        return f"fullft-{catalogue}", ["--learning_rate", FULL_LR]
    return f"{catalogue}-r{rank}", ["--lora_r", str(rank), "--lora_alpha", str(rank)]


def catalogue_file(catalogue: str, real: Path, work: Path, write: bool = True) -> Path:
    if catalogue == "real300":
        return real
    path = work / "catalogues" / f"{catalogue}.jsonl"
    if write and not path.is_file():
        import make_sample

        make_sample.write_catalogue(int(catalogue[3:]), path, GEN_SEED)
    return path


def estimated_steps(path: Path, catalogue: str) -> tuple[int | None, int | None]:
    """About how many train products and optimizer steps a row takes: 90% of the catalogue (the default val and test
    shares), the default passes, batch 4. Cleaning drops a few real records, so real300 trains somewhat fewer."""
    from titletune.config import DEFAULTS, DataArguments

    args = DataArguments(data=str(path))
    if catalogue == "real300":
        if not path.is_file():
            return None, None
        products = sum(1 for line in path.open("rb") if line.strip())
    else:
        products = int(catalogue[3:])
    train = round(products * (1 - args.val_size - args.test_size))
    return train, math.ceil(train * config.PASSES / DEFAULTS["per_device_train_batch_size"])


def cpu() -> dict:
    """lscpu's model name, family and model, and the flags that decide CPU training speed."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        text = ""
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}
    flags = set(fields.get("Flags", "").split())
    return {
        "model_name": fields.get("Model name"),
        "family": fields.get("CPU family"),
        "model": fields.get("Model"),
        "cpus": os.cpu_count(),
        "avx2": "avx2" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": bool(flags & {"amx_bf16", "amx_tile"}),
    }


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def done(rows: list[dict]) -> set[str]:
    """Rows this benchmark finished at the default passes."""
    mine = [r for r in rows if r.get("measured_by") == ME and r.get("views") == config.PASSES]
    return {r["row"] for r in mine if not r.get("error")}


def trainable_of(run_dir: Path, full: bool) -> int:
    """capacity.json's trainable parameters (train.py); for full fine-tuning, every weight in merged/."""
    if not full:
        return int(json.loads((run_dir / capacity.FILE).read_text())["trainable"])
    from safetensors import safe_open

    total = 0
    for path in (run_dir / "merged").glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


class Stopped(Exception):
    """train.py was stopped (Ctrl-C or SIGTERM) after saving a checkpoint: no row, the folder stays to resume."""


STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # train.py's exits (errors.cli) after Ctrl-C and SIGTERM


def resume_point(row: str, work: Path) -> Path | None:
    """Where a stopped sweep left a LoRA row: the newest complete checkpoint of its folder, the one train.py --resume
    takes (resume.last_checkpoint), or None. Full fine-tuning always starts over."""
    run_dir = work / name_and_flags(row)[0]
    found = resume.last_checkpoint(run_dir) if parse_row(row)[1] is not None else None
    return Path(found) if found else None


def measure(row: str, real: Path, work: Path, samples: int, base_cache: dict, keep: bool, resume: bool) -> dict:
    """Train, count, score; a failure at any stage is kept in the row as `error`. `resume`: a LoRA row whose folder
    holds a checkpoint (a sweep stopped in it) continues from there, or starts over if train.py refuses to resume."""
    import bench_learn

    catalogue, rank = parse_row(row)
    name, flags = name_and_flags(row)
    record = {"row": row, "catalogue": catalogue, "rank": rank or "full", "alpha": rank, "views": config.PASSES}
    record.update(measured_by=ME, date=time.strftime("%Y-%m-%d %H:%M"), commit=_commit(), flags=flags, cpu=cpu())
    record["load_before"] = os.getloadavg()[0]
    try:
        data = catalogue_file(catalogue, real, work)
        record["data"] = data.name  # the file, not where this machine keeps it
        checkpoint = resume_point(row, work) if resume else None
        if checkpoint is not None:
            print(f"{row}: resuming from {checkpoint.name}", flush=True)
            record["resumed_from"] = checkpoint.name
            record.update(bench_learn.train(name, flags, str(data), work, resume=True))
            if record["rc"] and record["rc"] not in STOPPED:  # refused (another commit's run, say): start over
                print(f"{row}: the resume failed (exit {record['rc']}); starting over", flush=True)
                del record["resumed_from"], record["error"]
                record.update(bench_learn.train(name, flags, str(data), work))
        else:
            record.update(bench_learn.train(name, flags, str(data), work))
        if record["rc"] in STOPPED:
            raise Stopped(row)
        if not record["rc"]:
            record.update(count(Path(record["run"]), rank is None))
            record.update(bench_learn.score(record["run"], samples, base_cache))
    except Stopped:
        raise
    except Exception as e:  # noqa: BLE001 - a benchmark keeps every row, the failed ones with their error
        record["error"] = f"{type(e).__name__}: {e}"
    record["load_after"] = os.getloadavg()[0]
    if not keep and record.get("run"):
        shutil.rmtree(record["run"], ignore_errors=True)
    return record


def count(run_dir: Path, full: bool) -> dict:
    """The train split's products and mean answer tokens (all of them, the base model's tokenizer), the trainable
    parameters, the capacity ratio, and what the law predicted."""
    from transformers import AutoTokenizer

    from titletune import runs, training

    run = runs.load(run_dir)
    products, answers = training.sample_answers(run.data / "train.jsonl", None, run.seed)
    tokens = capacity.mean_tokens(AutoTokenizer.from_pretrained(run.base_model), answers)
    estimate = capacity.estimate(trainable_of(run_dir, full), products, tokens, config.PASSES)
    return {
        "products": products,
        "answer_tokens": round(tokens, 2),
        "catalogue_tokens": estimate.catalogue_tokens,
        "trainable": estimate.trainable,
        "ratio": estimate.ratio,
        "predicted": round(estimate.recall, 3),
        "law": estimate.to_json()["law"],
    }


def _commit() -> str | None:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


# ------------------------------------------------------------------------------------------------------- the law


def fit_points(rows: list[dict]) -> tuple[list[dict], float]:
    """The LoRA rows the law is fitted to (the last finished one per row and views), and the floor: the mean of their
    base models' seen ROUGE-L. Real records only: a generated catalogue is another difficulty (its gen300 rows
    measure how far), so its rows test the law's shape in catalogue size rather than set its constants."""
    latest: dict = {}
    for r in rows:
        if r.get("catalogue") != "real300":
            continue
        if not r.get("error") and r.get("rank") != "full" and r.get("ratio") and (r.get("seen") or {}).get("tuned"):
            latest[(r["row"], r["views"])] = r
    used = list(latest.values())
    bases = [r["seen"]["base"]["mean"] for r in used if (r["seen"].get("base") or {}).get("mean") is not None]
    return used, round(sum(bases) / len(bases), 3) if bases else config.CAPACITY_FLOOR


def fit(rows: list[dict], predict: list[tuple[float, ...]], seed: int = 0) -> dict:
    """The law through the rows, and bootstrap intervals: each resample draws every row's recall from its own 95%
    interval (a normal of that width) and, with three ratios or more at the law's views, resamples the rows too."""
    import numpy as np

    used, floor = fit_points(rows)
    points = [(r["ratio"], r["views"], r["seen"]["tuned"]["mean"]) for r in used]
    law = capacity.fit(points, floor)
    sds = [(r["seen"]["tuned"]["ci"][1] - r["seen"]["tuned"]["ci"][0]) / 3.92 for r in used]
    ratios = {r for r, v, _ in points if v == law.views}
    rng = np.random.default_rng(seed)
    draws: list[capacity.Law] = []
    while len(draws) < BOOTSTRAP:
        pick = rng.integers(0, len(points), len(points)) if len(ratios) >= 3 else np.arange(len(points))
        noisy = [(points[i][0], points[i][1], float(rng.normal(points[i][2], sds[i]))) for i in pick]
        try:
            draws.append(capacity.fit(noisy, floor))
        except (ValueError, ZeroDivisionError):
            continue
    interval = {}
    for key in ("midpoint", "slope", "views_exponent"):
        values = np.array([getattr(d, key) for d in draws])
        interval[key] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
    ratio50 = np.array([d.ratio_for(config.CAPACITY_WARN) for d in draws])
    forecasts = []
    for trainable, products, tokens, views in predict:
        e = capacity.estimate(int(trainable), int(products), tokens, views, law)
        recalls = np.array([d.recall(e.ratio, views) for d in draws])
        fits = np.array([d.ratio_for(config.CAPACITY_WARN, views) * trainable / tokens for d in draws])
        forecasts.append(
            {
                "trainable": int(trainable), "products": int(products), "answer_tokens": tokens, "views": views,
                "ratio": e.ratio, "recall": e.recall, "recall_ci": _pct(recalls),
                "fits_products": e.fits_products, "fits_products_ci": _pct(fits),
            }
        )  # fmt: skip
    return {
        "law": law,
        "interval": interval,
        "rows_resampled": len(ratios) >= 3,
        "ratio_at_warn": [law.ratio_for(config.CAPACITY_WARN), *_pct(ratio50)],
        "residuals": [(r["row"], r["views"], y, law.recall(x, v)) for r, (x, v, y) in zip(used, points, strict=True)],
        "forecasts": forecasts,
    }


def _pct(values) -> list[float]:
    import numpy as np

    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def print_fit(result: dict) -> None:
    law, iv = result["law"], result["interval"]
    how = "the rows resampled" if result["rows_resampled"] else "the rows kept: under 3 ratios at the law's views"
    print(
        f"capacity law over {len(result['residuals'])} rows; 95% bootstrap intervals ({BOOTSTRAP} resamples, {how}, "
        "each row's recall drawn from its own interval)"
    )
    print(f"  floor {law.floor:.3f} (the rows' base seen ROUGE-L)")
    for key in ("midpoint", "slope", "views_exponent"):
        print(f"  {key} {getattr(law, key):.3f} [{iv[key][0]:.3f}, {iv[key][1]:.3f}]")
    at, low, high = result["ratio_at_warn"]
    at_views = f"{config.CAPACITY_WARN:g}, {law.views:g} views"
    print(f"  ratio at predicted seen ROUGE-L {at_views}: {at:.3g} [{low:.3g}, {high:.3g}]")
    print("  row, views: measured -> law")
    for row, views, measured, predicted in result["residuals"]:
        print(f"    {row}, {views:g}: {measured:.3f} -> {predicted:.3f}")
    for f in result["forecasts"]:
        print(
            f"forecast: {f['trainable']:,} trainable, {f['products']:,} products x {f['answer_tokens']:g} tokens, "
            f"{f['views']:g} views: ratio {f['ratio']:.3g}, seen ROUGE-L {f['recall']:.3f} "
            f"[{f['recall_ci'][0]:.3f}, {f['recall_ci'][1]:.3f}]; holds {f['fits_products']:,} products "
            f"[{f['fits_products_ci'][0]:,.0f}, {f['fits_products_ci'][1]:,.0f}] at {config.CAPACITY_WARN:g}"
        )
    print("\nthe constants for titletune/config.py:")
    print(f"CAPACITY_FLOOR = {law.floor:.3f}")
    print(f"CAPACITY_MIDPOINT = {law.midpoint:.3f}")
    print(f"CAPACITY_SLOPE = {law.slope:.2f}")
    print(f"CAPACITY_VIEWS = {law.views:g}")
    print(f"CAPACITY_VIEWS_EXPONENT = {law.views_exponent:.1f}")


# ----------------------------------------------------------------------------------------------------- the table


def table(rows: list[dict], plan: list[str]) -> str:
    """bench/README.md's table: every measured row (the last per row and views), then the plan's rows not yet there."""
    head = (
        "| row | views | trainable | train products | mean answer tokens | catalogue tokens | ratio | predicted | "
        "seen ROUGE-L | new phrasing | loss last | train s | steps | CPU | load | source |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---|---|---|"
    )
    latest = {(r["row"], r.get("views")): r for r in rows}
    lines = [head]
    for (row, views), r in latest.items():
        if r.get("error"):
            lines.append(f"| {row} | {views} | failed: {r['error'][:80]} |" + " |" * 13)
            continue
        seen, new = r.get("seen") or {}, r.get("seen_new_phrasing") or {}
        c = r.get("cpu") or {}
        kind = c.get("model_name") or "-"
        if c.get("family"):
            kind += f" (family {c['family']}" + (f" model {c['model']})" if c.get("model") else ")")
        lines.append(
            f"| {row} | {views:g} | {_n(r.get('trainable'))} | {_n(r.get('products'))} | "
            f"{_f(r.get('answer_tokens'), 1)} | {_n(r.get('catalogue_tokens'))} | {_f(r.get('ratio'), 3, 'g')} | "
            f"{_f(r.get('predicted'), 2)} | "
            f"{_ci(seen.get('tuned'))} | {_ci(new.get('tuned'))} | {_f(r.get('loss_last'), 2)} | "
            f"{_n(r.get('train_s'))}{' (resumed)' if r.get('resumed_from') else ''} | {_n(r.get('steps'))} | "
            f"{kind} | {_load(r)} | {r.get('measured_by')} |"
        )
    for row in plan:
        had = latest.get((row, config.PASSES))
        if had is not None and had.get("measured_by") == ME:
            continue
        note = "not yet measured"
        if had is not None:
            note = f"copied in (source {had.get('measured_by')}, above); not yet measured by bench_capacity.py"
        lines.append(f"| {row} | {config.PASSES} | {note} |" + " |" * 13)
    return "\n".join(lines)


def _load(r: dict) -> str:
    if r.get("load_before") is None:
        return "quiet (not recorded)" if "quiet" in r.get("source", "") else "-"
    return f"{r['load_before']:.1f} -> {r['load_after']:.1f}"


def _n(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _f(x, digits: int, kind: str = "f") -> str:
    return "-" if x is None else f"{x:.{digits}{kind}}"


def _ci(cell: dict | None) -> str:
    if not cell or cell.get("mean") is None:
        return "-"
    low, high = cell["ci"]
    return f"{cell['mean']:.3f} [{low:.3f}, {high:.3f}]"


# ------------------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma list of catalogue:rN or catalogue:full")
    parser.add_argument("--real", default=str(REAL), help="the 300 real records of real300 (trn format)")
    parser.add_argument("--samples", type=int, default=50, help="trained products scored (held-out: the test split)")
    parser.add_argument("--results", default=str(RESULTS), help="rows are appended here, one JSON line each")
    parser.add_argument("--work", default="/tmp/capacity", help="run folders and generated catalogues")
    parser.add_argument("--keep", action="store_true", help="keep each run folder after scoring")
    parser.add_argument("--redo", action="store_true", help="measure rows again that --results already holds")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (rows, commands, steps) and exit")
    parser.add_argument("--fit", action="store_true", help="fit the capacity law to --results and print it")
    parser.add_argument(
        "--predict",
        action="append",
        default=[],
        help="with --fit: TRAINABLE,PRODUCTS,ANSWER_TOKENS,VIEWS to forecast, e.g. 24.3e6,90000,130,4",
    )
    parser.add_argument("--table", action="store_true", help="print --results as bench/README.md's table")
    args = parser.parse_args()
    logs.setup(logging.WARNING)  # train.py's quiet log: the libraries' import-time noise off, our bars kept
    try:
        plan = [r.strip() for r in args.rows.split(",") if r.strip()]
        for row in plan:
            parse_row(row)
        predict = [tuple(float(x) for x in p.split(",")) for p in args.predict]
        if any(len(p) != 4 for p in predict):
            raise ValueError("--predict takes TRAINABLE,PRODUCTS,ANSWER_TOKENS,VIEWS")
    except ValueError as e:
        parser.error(str(e))
    results, real, work = Path(args.results), Path(args.real), Path(args.work)
    rows = read_rows(results)
    if args.fit:
        return print_fit(fit(rows, predict))
    if args.table:
        return print(table(rows, plan))
    finished = set() if args.redo else done(rows)
    if args.dry_run:
        import bench_learn

        for row in plan:
            catalogue, _ = parse_row(row)
            name, flags = name_and_flags(row)
            path = catalogue_file(catalogue, real, work, write=False)
            products, steps = estimated_steps(path, catalogue)
            checkpoint = None if args.redo else resume_point(row, work)
            status = (
                "done: skipped" if row in finished else f"to resume from {checkpoint.name}" if checkpoint else "to run"
            )
            cmd = " ".join(bench_learn.command(name, flags, str(path), work, resume=bool(checkpoint))[1:])
            via = " (full fine-tuning: bench_learn.py's path, train.py --prepare_only first)" if "full" in row else ""
            print(f"{row}: {status}; about {products} train products, {steps} steps{via}\n    python {cmd}")
        return
    base_cache: dict = {}
    for row in plan:
        if row in finished:
            print(f"{row}: in {results.name}, skipped (--redo measures it again)", flush=True)
            continue
        try:
            record = measure(row, real, work, args.samples, base_cache, args.keep, resume=not args.redo)
        except (Stopped, KeyboardInterrupt):
            print(f"{row}: stopped; its folder and checkpoints stay in {work}: run the same command to resume it")
            raise SystemExit(130) from None
        print(json.dumps(record), flush=True)
        with results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
