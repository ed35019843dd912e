"""What the export fidelity check costs: a finished run's GGUF export timed with and without it, A/B interleaved.

    python bench/bench_export.py --run outputs/<run> --rounds 3            # f16, q8_0, q4_k_m, as train.py
    python bench/bench_export.py --run outputs/<run> --gguf q4_k_m,q8_0 --samples 3

Each export runs in its own process (`--child`) into a scratch folder, as train.py's export stage runs it: merge the
adapter into the base (merged/), then export.export on the run's own products. "without" is `--fidelity-samples 0` and no
verify question (convert + quantize + the chat round trip, which always runs), "with" is the default check. Rounds
alternate A B B A ... and the medians are compared. Printed: wall seconds of the whole export per variant, the
check's own seconds as export.json records them, the machine's CPU and flags, and the load average around each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from titletune import config


def child(run_dir: str, out_dir: str, gguf: str, samples: int) -> dict:
    """One export of run_dir's merged/ into out_dir; what export.json says, plus the wall time."""
    from transformers import AutoTokenizer

    import titletune  # noqa: F401  (OMP_WAIT_POLICY before torch and llama_cpp load)
    from titletune import export, fidelity, runs
    from titletune.backends import hf

    run = runs.load(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run.adapter)
    chosen = fidelity.samples({"test": run.split("test"), "train": run.split("train")}, samples)
    started = time.perf_counter()
    merged = Path(out_dir) / "merged"  # train.py's export stage starts with the merge: timed as part of it
    hf.merge(None, tokenizer, run.base_model, run.adapter, merged, run.trust_remote_code(False))
    merge_s = time.perf_counter() - started
    report = export.export(
        out_dir,
        merged,
        export.parse_gguf_types(gguf),
        run.prompts.system,
        tokenizer,
        export.Options(verify=samples > 0, samples=chosen),
    )
    wall = time.perf_counter() - started
    return {
        "wall_s": round(wall, 2),
        "merge_s": round(merge_s, 2),
        "convert_quantize_s": round(sum(f["seconds"] for f in report["files"]), 2),
        "round_trip_s": round(sum(f.get("round_trip_seconds", 0.0) for f in report["files"]), 2),
        "check_s": (report.get("fidelity_merged") or {}).get("check_seconds"),
        "merged_side_s": (report.get("fidelity_merged") or {}).get("seconds"),
        "waited_s": (report.get("fidelity_merged") or {}).get("waited_seconds"),
        "files": {
            f["name"]: {k: f["fidelity"][k] for k in ("identical", "kl_divergence", "seconds")}
            for f in report["files"]
            if f.get("fidelity")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished run folder (adapter/ and merged/)")
    parser.add_argument(
        "--gguf",
        default=config.ExportArguments().gguf,
        help="GGUF types, as train.py --gguf (f16 is always written; default: train.py's)",
    )
    parser.add_argument(
        "--samples", type=int, default=config.FIDELITY_SAMPLES, help="fidelity products per split for 'with'"
    )
    parser.add_argument("--rounds", type=int, default=3, help="A/B pairs, order alternating")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # internal: run_dir out_dir gguf samples
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.child[2], int(args.child[3]))))
        return
    if not args.run or not (Path(args.run) / "merged" / "config.json").is_file():
        parser.error("--run must be a finished run folder with merged/")
    from bench_rag import cpu_name

    variants = {"without": 0, "with": args.samples}
    order = []
    for i in range(args.rounds):
        order += ["without", "with"] if i % 2 == 0 else ["with", "without"]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    flags = sorted({f for f in _flags() if f.startswith(("avx512", "amx", "avx2", "avx_vnni"))})
    print(json.dumps({"cpu": cpu_name(), "flags": flags, "cpus": os.cpu_count()}), flush=True)
    for name in order:
        with tempfile.TemporaryDirectory(prefix="bench_export_") as out:
            load = os.getloadavg()[0]
            cmd = [sys.executable, __file__, "--child", args.run, out, args.gguf, str(variants[name])]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update(variant=name, load_before=load, load_after=os.getloadavg()[0])
            results[name].append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    # wall_s runs from the start of the merge to the end of the export; the export alone is wall_s - merge_s.
    med = {v: statistics.median(r["wall_s"] for r in rows) for v, rows in results.items()}
    exp = {v: statistics.median(r["wall_s"] - r["merge_s"] for r in rows) for v, rows in results.items()}
    check = statistics.median(r["check_s"] for r in results["with"])
    print(
        json.dumps(
            {
                "median_merge_export_without_s": med["without"],
                "median_merge_export_with_s": med["with"],
                "added_s": round(med["with"] - med["without"], 2),
                "added_share": round(med["with"] / med["without"] - 1, 3),
                "median_export_only_without_s": exp["without"],
                "added_share_of_export_only": round(exp["with"] / exp["without"] - 1, 3),
                "median_check_s_recorded": check,
            }
        )
    )


def _flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


if __name__ == "__main__":
    main()
