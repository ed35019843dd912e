"""Evaluation settings, measured: repetition penalty (fair decoding) and RAG's k, on one trained run.

    python bench/bench_eval.py --run outputs/real --data <trn file> --rag-index <trn file> --samples 20
    python bench/bench_eval.py --run outputs/demo --configs k3_rep1.0,k3_rep1.1

Every configuration is a full titletune evaluation (evaluate.evaluate_run, five systems, two populations) of the same
products, with the model loaded once; reports go to a copy of the run, so the run's own report.json is untouched. Per
configuration and population it prints ROUGE-L F1 with its 95% interval for every system, numbers supported, how
many answers loop (a 4-word phrase said 3 or more times), and the seconds each system took to answer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "k3_rep1.0": {"rag_k": 3, "repetition_penalty": 1.0},
    "k3_rep1.1": {"rag_k": 3, "repetition_penalty": 1.1},
    "k1_rep1.0": {"rag_k": 1, "repetition_penalty": 1.0},
    "k5_rep1.0": {"rag_k": 5, "repetition_penalty": 1.0},
}


def loops(text: str) -> bool:
    """Whether some 4-word phrase appears 3 or more times: the greedy loop of a model that cannot stop."""
    words = re.findall(r"\w+", text.lower())
    grams = [" ".join(words[i : i + 4]) for i in range(len(words) - 3)]
    return any(grams.count(g) >= 3 for g in set(grams))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", help="trn-format file to sample products from (default: the run's splits)")
    parser.add_argument("--rag-index", help="trn-format file to search (default: the run's training products)")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of: {', '.join(CONFIGS)}")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    from titletune import engines, evaluate, runs

    source = Path(args.run)
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        copy = Path(tmp) / source.name
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns("checkpoint-*", "*.gguf", "merged", "cache"))
        run = runs.load(copy)
        engine = engines.load_engine(run, "transformers")
        results = {}
        for name in args.configs.split(","):
            conf = CONFIGS[name]
            settings = evaluate.EvalSettings(
                samples=args.samples,
                data=args.data,
                rag_k=conf["rag_k"],
                rag_index=args.rag_index,
                sampling=engines.Sampling(repetition_penalty=conf["repetition_penalty"]),
            )
            report = evaluate.evaluate_run(run, settings, engine=engine)
            out = {"seconds": report["seconds"], "load": [round(x, 2) for x in os.getloadavg()]}
            for pop in evaluate.POPULATIONS:
                if pop not in report:
                    continue
                examples = [e for e in report["examples"] if e["population"] == pop]
                out[pop] = {
                    system: {
                        "rougeL": report[pop][system]["rougeL"],
                        "numbers": report[pop][system]["numbers"],
                        "loops": sum(loops(e[system]) for e in examples),
                    }
                    for system in report[pop]
                }
                out[pop]["differences"] = {k: v["rougeL"] for k, v in report["differences"][pop].items()}
            results[name] = out
            print(f"\n== {name}  (seconds {out['seconds']})")
            for pop in evaluate.POPULATIONS:
                if pop not in out:
                    continue
                print(f"  {pop}:")
                for system, m in out[pop].items():
                    if system == "differences":
                        continue
                    r, n = m["rougeL"], m["numbers"]
                    numbers = "-" if n["mean"] is None else f"{n['mean']:.2f} (n={n['n']})"
                    print(
                        f"    {system:10s} ROUGE-L {r['mean']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]  "
                        f"numbers {numbers}  loops {m['loops']}/{len(examples)}"
                    )
                for pair, d in out[pop]["differences"].items():
                    print(
                        f"    {pair}: {d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] significant={d['significant']}"
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
