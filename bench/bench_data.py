"""Data-prep throughput and peak memory: titletune.prepare.prepare vs pandas.read_json + .apply, on a fake trn.json.

    python bench/bench_data.py --lines 2248619 --out /tmp/trn_synth.json              # full size (1.9 GB)
    python bench/bench_data.py --lines 224862 --out /tmp/trn_synth_10pct.json         # 10%, a few minutes

The file is shaped like the real LF-AmazonTitles-1.3M trn.json (data/README.md): titles lognormal around a median of
54 chars, contents around 398 (mean 619, one 197,622-char outlier), 33.4% empty contents, 5.6% empty titles, ~3%
repeated titles, HTML entities, tags and glued edition notes. Each measurement runs in its own subprocess, which
reports its own peak memory: the peak, sampled every 50 ms, of the summed PSS of that process and its worker
processes (PSS shares the pages a forked worker shares with its parent, so nothing is counted twice), and VmHWM of the
main process alone. prepare() is measured with --data_workers 1 and with auto (one per CPU). pandas is measured on a slice (--naive_fraction) of the file: it holds the whole frame in
memory, which at full size needs many GB on a shared machine. Pass --naive_fraction 1 to try it on the full file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENTITIES = ["&#8217;s", "&amp;", "&#8212;", "&#8220;quoted&#8221;", "&quot;", "&#x2019;", "&#160;", "&amp;#8217;"]
NOTES = [
    "--This text refers to theHardcoveredition.",
    "--This text refers to thePaperbackedition.",
    "--This text refers to an out of print or unavailable edition of this title.",
]


def generate(path: Path, lines: int, seed: int = 0) -> float:
    """Write a synthetic trn.json with `lines` rows, in chunks so memory stays small; returns the seconds it took."""
    import numpy as np
    import orjson

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ra", "to", "su", "vi", "den", "mor", "tal", "ber", "quin", "sol", "gar"]
    pool = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(6000)]
    pool += ["the", "and", "with", "for", "of", "a", "in", "is", "this", "book", "set", "cotton", "steel", "kit"] * 200
    # One long corpus to slice contents from: slicing is far faster than joining words per row.
    tokens = []
    for i, word in enumerate(rng.choice(pool, size=1_500_000)):
        tokens.append(f"{word}." if i % 13 == 12 else str(word))
        draw = rng.random()
        if draw < 0.004:
            tokens.append(ENTITIES[i % len(ENTITIES)])
        elif draw < 0.0045:
            tokens.append("<br>")
        elif draw < 0.0048:
            tokens.append("caf\u00e9")
    corpus = " ".join(tokens)
    title_words = [w.capitalize() for w in pool[:6000]] + ["Edition", "Set", "Pack", "Women's", "Kids", "(Hardcover)"]
    targets = [
        (orjson.dumps(list(range(int(i), int(i) + int(k)))), orjson.dumps([1.0] * int(k)))
        for i, k in zip(rng.integers(0, 1_300_000, 512), rng.integers(1, 60, 512), strict=True)
    ]
    recent: list[str] = []  # titles to repeat, like the 39,961 repeated titles of the real file
    with open(path, "wb") as f:
        for first in range(0, lines, 100_000):
            n = min(100_000, lines - first)
            title_len = np.clip(rng.lognormal(np.log(54), 0.494, n), 3, 1999).astype(np.int64)  # mean 61, median 54
            content_len = np.clip(rng.lognormal(np.log(398), 0.94, n), 1, 197_622).astype(np.int64)  # 619 / 398
            if first == 0:
                content_len[0] = 197_622  # the real file's longest description
            offsets = rng.integers(0, len(corpus) - 200_000, n)
            empty_content, empty_title = rng.random(n) < 0.334, rng.random(n) < 0.056
            repeat, note = rng.random(n) < 0.03, rng.random(n) < 0.08
            title_idx = rng.integers(0, len(title_words), (n, 40), dtype=np.int32).tolist()
            buf = []
            for j in range(n):
                i = first + j
                if repeat[j] and recent:
                    title = recent[i % len(recent)]
                elif empty_title[j]:
                    title = ""
                else:
                    title = title_of(title_words, title_idx[j], int(title_len[j]))
                    if len(recent) < 5000:
                        recent.append(title)
                    else:
                        recent[i % 5000] = title
                content = ""
                if not empty_content[j]:
                    start = int(offsets[j])
                    content = corpus[start : start + int(content_len[j])] + (NOTES[i % 3] if note[j] else "")
                ind, rel = targets[i % 512]
                buf.append(
                    b'{"uid":"%010d","title":%b,"content":%b,"target_ind":%b,"target_rel":%b}\n'
                    % (i, orjson.dumps(title), orjson.dumps(content), ind, rel)
                )
            f.writelines(buf)
    return time.perf_counter() - started


def title_of(title_words: list[str], idx: list[int], length: int) -> str:
    """Words from the pool until the title reaches `length` characters."""
    out, size = [], 0
    for j in idx:
        word = title_words[j]
        out.append(word)
        size += len(word) + 1
        if size >= length:
            break
    return " ".join(out)


def measure_ours(path: Path, max_samples: str, workers: str = "auto") -> dict:
    """What train.py does before training: prepare() into a temp folder."""
    from titletune import prepare, prompts
    from titletune.config import DataArguments

    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        stats = prepare.prepare(
            DataArguments(data=str(path), max_samples=str(max_samples), data_workers=workers),
            seed=42,
            out_dir=out,
            prompts=prompts.load(ROOT / "prompts" / "qa"),
        )
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": stats["rows_read"], "kept": stats["kept"]["total"]}


def measure_naive(path: Path, max_samples: str) -> dict:
    """The obvious way: load everything with pandas, clean with .apply, dedupe, sample, split."""
    import pandas as pd

    from titletune.text import clean_text, title_key

    started = time.perf_counter()
    df = pd.read_json(path, lines=True, dtype=False)
    rows = len(df)
    df["title"] = df["title"].fillna("").astype(str).apply(clean_text).str.replace("\n", " ")
    df["content"] = df["content"].fillna("").astype(str).apply(clean_text)
    df = df[(df["title"] != "") & (df["content"].str.len() >= 20)]
    df = df.assign(key=df["title"].apply(title_key)).drop_duplicates("key")
    if max_samples != "all":
        df = df.sample(n=min(int(max_samples), len(df)), random_state=42)
    df["content"] = df["content"].str.slice(0, 2000)
    test = df.sample(frac=0.05, random_state=42)
    rest = df.drop(test.index)
    val = rest.sample(frac=0.05 / 0.95, random_state=42)
    train = rest.drop(val.index)
    with tempfile.TemporaryDirectory() as out:
        for name, part in (("train", train), ("val", val), ("test", test)):
            part[["uid", "title", "content"]].to_json(Path(out) / f"{name}.jsonl", orient="records", lines=True)
    return {"seconds": time.perf_counter() - started, "rows": rows, "kept": len(df)}


class TreeMemory:
    """Samples the summed PSS (MB) of this process and its children every `interval` s; .peak is the largest."""

    def __init__(self, interval: float = 0.05):
        import threading

        self.peak, self.interval = 0.0, interval
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    @staticmethod
    def pss_mb(pid: int) -> float:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def children(self) -> list[int]:
        try:
            return [int(c) for c in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()]
        except OSError:
            return []

    def run(self) -> None:
        while not self.done.wait(self.interval):
            total = sum(self.pss_mb(pid) for pid in (os.getpid(), *self.children()))
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child would report the
    parent's peak (here, the generator's) whenever that was higher."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_child(method: str, path: Path, max_samples: str, workers: str = "auto") -> dict:
    """Run one measurement in a fresh interpreter, so its peak memory is its own."""
    cmd = [sys.executable, __file__, "--measure", method, "--path", str(path), "--max_samples", str(max_samples)]
    cmd += ["--workers", workers]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def head_slice(path: Path, fraction: float) -> Path:
    if fraction >= 1:
        return path
    target = path.with_name(f"{path.stem}.{round(fraction * 100)}pct{path.suffix}")
    with open(path, "rb") as f:
        total = sum(1 for _ in f)
    keep = max(1, int(total * fraction))
    with open(path, "rb") as src, open(target, "wb") as dst:
        for i, line in enumerate(src):
            if i >= keep:
                break
            dst.write(line)
    return target


def row(method: str, path: Path, result: dict) -> str:
    size = path.stat().st_size / 1e6
    if "error" in result:
        return f"| {method} | {path.name} | | {size:,.0f} | failed: {result['error'][:80]} | | | | | |"
    return (
        f"| {method} | {path.name} | {result['rows']:,} | {size:,.0f} | {result['seconds']:.1f} | "
        f"{size / result['seconds']:.1f} | {result['cpu_seconds']:.1f} | {size / result['cpu_seconds']:.1f} | "
        f"{result['pss_mb']:,.0f} | {result['maxrss_mb']:,.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=2_248_619, help="rows to generate (real trn.json: 2,248,619)")
    parser.add_argument("--out", default="/tmp/trn_synth.json", help="synthetic file; reused if it exists")
    parser.add_argument("--regenerate", action="store_true", help="write --out even if it exists")
    parser.add_argument("--max_samples", default="100000", help="a number, or all (every product)")
    parser.add_argument("--skip_naive", action="store_true", help="measure prepare() only")
    parser.add_argument("--naive_fraction", type=float, default=0.1, help="share of the file pandas is measured on")
    parser.add_argument("--workers", default="1,auto", help="comma list of --data_workers values to measure")
    parser.add_argument("--measure", choices=["ours", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        memory = TreeMemory()
        if args.measure == "ours":
            result = measure_ours(Path(args.path), args.max_samples, args.workers)
        else:
            result = measure_naive(Path(args.path), args.max_samples)
        result["pss_mb"] = memory.stop()
        result["maxrss_mb"] = peak_rss_mb()
        cpu = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):  # workers included, once they have exited
            usage = resource.getrusage(who)
            cpu += usage.ru_utime + usage.ru_stime  # the machine is shared: wall time alone misleads
        result["cpu_seconds"] = cpu
        print(json.dumps(result))
        return

    path = Path(args.out)
    if args.regenerate or not path.exists():
        seconds = generate(path, args.lines)
        print(
            f"generated {path} ({path.stat().st_size / 1e6:,.0f} MB, {args.lines:,} lines) in {seconds:.1f} s",
            file=sys.stderr,
        )
    part = head_slice(path, args.naive_fraction)
    table = [
        "| method | file | rows | MB | wall s | MB/s (wall) | CPU s | MB/s per CPU s | peak PSS, all processes (MB) "
        "| main VmHWM (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    runs = []
    for target in dict.fromkeys([path, part]):
        for workers in args.workers.split(","):
            runs.append((f"titletune.prepare.prepare, --data_workers {workers}", "ours", target, workers))
    if not args.skip_naive:
        runs.append(("pandas.read_json + .apply", "naive", part, "1"))
    load_before = os.getloadavg()
    for label, method, target, workers in runs:
        result = run_child(method, target, args.max_samples, workers)
        table.append(row(label, target, result))
        print(table[-1], file=sys.stderr)
    load = " -> ".join("/".join(f"{x:.2f}" for x in avg) for avg in (load_before, os.getloadavg()))
    print(f"\nmax_samples={args.max_samples}; {platform.python_version()}; {os.cpu_count()} CPUs; load {load}\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
