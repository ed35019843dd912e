"""The catalogue search index (titletune/retrieval.py, SQLite FTS5) at full catalogue size: build and query.

    python bench/bench_rag.py --lines 2248619 --data /tmp/trn_synth.json      # full size; writes the file if missing
    python bench/bench_rag.py --lines 224862 --data /tmp/trn_synth_10pct.json # 10%

The file is bench_data.py's synthetic trn.json (shaped like the real one: 33% empty contents, 5.6% empty titles, ~3%
repeated titles). The build runs in its own subprocess, which reports its wall time and peak RSS (VmHWM); the index's
size on disk is the SQLite file's. Then --queries questions, phrased as training asks them about products sampled
from the file, are timed one by one (top --k), cold cache first: with Index.search (the title first, then the broad
query) and then, on the first --old-queries of the same questions and the same index, with Index.search_any (the
broad query alone, which was the whole search of index FORMAT 3). For each the report gives p50, p95 and max, and
the share of questions whose own product comes first; for search, how many needed the broad query (fallbacks).
search is also timed on the same questions with each title's words in reverse order (search_reversed): no title is
then named exactly, so this measures step 2, the AND query over the titles index.
The broad query takes about a second a question at full size on 2 cores: --old-queries 200 shortens the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DATA = {"title_field": "title", "content_field": "content", "min_content_chars": 20, "max_content_chars": 400}


def build_child(path: str, cache: str) -> None:
    from titletune import retrieval

    started = time.perf_counter()
    index = retrieval.for_file(path, DATA, Path(cache))
    seconds = time.perf_counter() - started
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(
        json.dumps(
            {
                "seconds": round(seconds, 1),
                "rows": len(index),
                "peak_rss_mb": round(hwm / 1024),
                "path": str(index.path),
            }
        )
    )


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def cpu_info() -> dict:
    """The CPU's model name and family, and which of the wide vector extensions it has."""
    field: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            name, _, value = line.partition(":")
            field.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    flags = set(field.get("flags", "").split())
    wide = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    return {"cpu": cpu_name(), "cpu_family": field.get("cpu family"), "cpu_flags": wide}


def measure(search, questions: list[tuple[str, str]], k: int) -> dict:
    """Each question timed alone; the share whose own product (its title: titles are deduplicated) comes first."""
    times, first = [], 0
    for question, title in questions:
        started = time.perf_counter()
        hits = search(question, k)
        times.append((time.perf_counter() - started) * 1000)
        first += bool(hits) and hits[0]["title"] == title
    times.sort()
    return {
        "queries": len(times),
        "query_ms_p50": round(statistics.median(times), 2),
        "query_ms_p95": round(times[int(0.95 * (len(times) - 1))], 2),
        "query_ms_max": round(times[-1], 2),
        "own_title_first": round(first / max(1, len(times)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=2_248_619, help="rows of the synthetic file, if it is written")
    parser.add_argument("--data", default="/tmp/trn_synth.json", help="the synthetic trn.json (written if missing)")
    parser.add_argument("--queries", type=int, default=1000, help="questions timed")
    parser.add_argument("--old-queries", type=int, help="questions also timed with search_any (default: all; 0: none)")
    parser.add_argument("--k", type=int, default=1, help="entries per query (RAG_K, the default --rag-k)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return build_child(*args.child)

    import bench_data

    from titletune import prompts, retrieval
    from titletune.reading import iter_products
    from titletune.selection import clean_product

    path = Path(args.data)
    if not path.is_file():
        print(f"writing {path} ({args.lines:,} rows) ...", file=sys.stderr)
        bench_data.generate(path, args.lines)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_rag_") as cache:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(path), cache], capture_output=True, text=True, check=True
        )
        built = json.loads(proc.stdout.strip().splitlines()[-1])
        size = Path(built["path"]).stat().st_size
        # Questions about products drawn uniformly from the file's kept products (reservoir), phrased as in training.
        rng = random.Random(0)
        picked: list[tuple[str, str]] = []
        kept = 0
        for row in iter_products(path):
            got = clean_product(row, DATA["min_content_chars"])
            if isinstance(got, str):
                continue
            kept += 1
            if len(picked) < args.queries:
                picked.append((str(row["id"]), got[0]))
            elif (j := rng.randrange(kept)) < args.queries:
                picked[j] = (str(row["id"]), got[0])
        ps = prompts.load(ROOT / "prompts" / "qa")
        index = retrieval.Index(Path(built["path"]), path.name)
        questions = [(prompts.question(ps, title, pid, 42), title) for pid, title in picked]
        old = len(questions) if args.old_queries is None else args.old_queries
        timed = {"search": measure(index.search, questions, args.k)}
        timed["search"]["fallbacks"] = index.fallbacks
        index.fallbacks = 0
        reversed_ = [(prompts.question(ps, " ".join(title.split()[::-1]), pid, 42), title) for pid, title in picked]
        timed["search_reversed"] = measure(index.search, reversed_, args.k)
        timed["search_reversed"]["fallbacks"] = index.fallbacks
        if old > 0:
            timed["search_any"] = measure(index.search_any, questions[:old], args.k)
        index.close()
    result = {
        **cpu_info(),
        "load_before": [round(x, 2) for x in load],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "file": str(path),
        "file_gb": round(path.stat().st_size / 1e9, 2),
        "rows_indexed": built["rows"],
        "build_s": built["seconds"],
        "build_peak_rss_mb": built["peak_rss_mb"],
        "index_mb": round(size / 1e6, 1),
        "k": args.k,
        **timed,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
