"""Generation speed at batch 1 on CPU: llama.cpp GGUFs (q4_k_m, q8_0, f16) against transformers (fp32, bf16).

    .venv/bin/python bench/bench_infer.py                                   # 10 engine setups once, ~2 min
    .venv/bin/python bench/bench_infer.py --rounds 2 --gguf_dir /tmp/gguf   # palindromic order, GGUFs kept for reuse
    .venv/bin/python bench/bench_infer.py --model outputs/<run>/merged --configs hf:bf16:2,gguf:q4_k_m:1
    .venv/bin/python bench/bench_infer.py --configs gguf:q8_0:2,ggufx:q8_0:2 --rounds 4   # the loader's cost

gguf loads as the project does (titletune.llamacpp: no extra buffer types); ggufx as llama.cpp does by default, with
its AMX or repacked weight layouts where the build has them (on an AMX Xeon, quantized files then crash).

The model is the embedded SmolLM2-135M-Instruct (base_models.embedded_hf_dir()), or --model (a merged run, with the
same shapes). Its GGUFs are made the way train.py makes them: converter.convert (llama.cpp's convert_hf_to_gguf.py) to
f16, then converter.quantize to q8_0 and q4_k_m. Every engine gets the same prompt token ids (the tokenizer's chat
template over the qa prompt set: system prompt + one catalogue question) and decodes greedily for exactly
--max_new_tokens tokens, batch 1: the end-of-sequence token is not allowed to stop it, so every engine does the same
work. One engine per subprocess (its own threads and OpenMP state); each does one untimed warm-up generation, then
--reps timed ones, of which the median is reported.

Reported: tokens/s end to end (prompt included), the decode rate after the first token, the prompt time, and how
many of the generated tokens agree with transformers fp32 (a quantized model drifts after its first differing token).
llama.cpp gets n_threads = n_threads_batch = 1 or 2 and OMP_WAIT_POLICY=PASSIVE (as titletune.export runs it;
measured at 1-10 tok/s without it on a loaded machine); transformers gets torch's 2 threads and GOMP_SPINCOUNT=10000
(see bench_train.py). The load average is recorded before and after every run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# How idle OpenMP threads wait, read once when libgomp loads (torch or llama_cpp), so set in each child's environment.
# An optional 4th part of a config picks one; without it, llama.cpp runs as titletune.export runs it (PASSIVE:
# it measured 1-10 tok/s without it under load) and torch with the short spin bench_train.py found best.
POLICIES = {"passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin": {}, "spin10k": {"GOMP_SPINCOUNT": "10000"}}
DEFAULT_POLICY = {"gguf": "passive", "ggufx": "passive", "hf": "spin10k"}
DEFAULT_CONFIGS = [
    "hf:fp32:2",
    "hf:bf16:2",
    "gguf:q4_k_m:1",
    "gguf:q8_0:1",
    "gguf:f16:1",
    "gguf:q4_k_m:2",
    "gguf:q8_0:2",
    "gguf:f16:2",
    "gguf:q4_k_m:2:spin",
    "hf:bf16:2:passive",
]
QUESTION = "Tell me about The Lighthouse Keeper's Ledger (Hardcover)."


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def prompt_ids(model_dir: str) -> list[int]:
    """The chat prompt as train.py's runs ask it: the qa system prompt + one question, with the generation prompt."""
    from transformers import AutoTokenizer

    from titletune import prompts

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = prompts.messages(prompts.load(ROOT / "prompts" / "qa").system, QUESTION)
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    return list(encoded["input_ids"])


# ------------------------------------------------------------------------------------------------ the engines


def run_hf(model_dir: str, dtype_name: str, threads: int, ids: list[int], new: int, reps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    inputs = torch.tensor([ids])

    class FirstToken(BaseStreamer):
        """generate() calls put() with the prompt first, then with each new token."""

        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self):
            pass

    def once(n: int) -> tuple[float, float, float, list[int]]:
        streamer = FirstToken()
        w0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                streamer=streamer,
                pad_token_id=model.config.eos_token_id,
            )
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        return wall, streamer.first - w0, cpu, out[0, len(ids) :].tolist()

    once(8)
    return _summarise([once(new) for _ in range(reps)], new)


def run_gguf(path: str, threads: int, ids: list[int], new: int, reps: int, extra_bufts: bool = False) -> dict:
    from titletune import llamacpp

    llamacpp.USE_EXTRA_BUFFER_TYPES = extra_bufts  # ggufx: llama.cpp's own default (AMX/repacked weights where built)
    llm = llamacpp.load(path, threads=threads)

    def once(n: int) -> tuple[float, float, float, list[int]]:
        llm.reset()  # no KV-cache prefix reuse: every repetition evaluates the whole prompt, as a new chat would
        out, first = [], None
        w0, c0 = time.perf_counter(), time.process_time()
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            out.append(token)
            if first is None:
                first = time.perf_counter() - w0
            if len(out) == n:  # eos does not stop it: same work as transformers with min_new_tokens
                break
        return time.perf_counter() - w0, first, time.process_time() - c0, out

    once(8)
    return _summarise([once(new) for _ in range(reps)], new)


def _summarise(results: list[tuple[float, float, float, list[int]]], new: int) -> dict:
    walls = [r[0] for r in results]
    k = walls.index(statistics.median_low(walls))
    wall, first, cpu, ids = results[k]
    return {
        "tok_s": new / wall,
        "decode_tok_s": (new - 1) / (wall - first),
        "first_token_s": first,
        "tok_per_cpu_s": new / cpu,
        "walls": [round(w, 3) for w in walls],
        "ids": ids,
    }


# ---------------------------------------------------------------------------------------------------- driver


def make_ggufs(model_dir: Path, out_dir: Path) -> dict[str, Path]:
    """f16 from the converter, q8_0 and q4_k_m from llama.cpp's quantizer; files already in out_dir are reused."""
    from titletune import converter

    out_dir.mkdir(parents=True, exist_ok=True)
    f16 = out_dir / "model.f16.gguf"
    if not f16.is_file():
        started = time.perf_counter()
        converter.convert(model_dir, f16, "f16")
        print(f"converted to {f16} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    files = {"f16": f16}
    for qtype in ("q8_0", "q4_k_m"):
        files[qtype] = out_dir / f"model.{qtype}.gguf"
        if not files[qtype].is_file():
            with quiet_stderr():  # llama.cpp warns for each tensor whose 576 columns do not fit q4_K's 256-blocks
                converter.quantize(f16, files[qtype], qtype)
    return files


@contextlib.contextmanager
def quiet_stderr():
    """Send file descriptor 2, where llama.cpp's C code writes, to /dev/null for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def policy(config: str) -> str:
    parts = config.split(":")
    return parts[3] if len(parts) > 3 else DEFAULT_POLICY[parts[0]]


def run_child(config: str, target: str, ids: list[int], args: argparse.Namespace) -> dict:
    request = {"config": config, "target": target, "ids": ids, "new": args.max_new_tokens, "reps": args.reps}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):  # titletune.export sets PASSIVE in this process on import
        env.pop(key, None)
    env.update(POLICIES[policy(config)])
    before = load_average()
    cmd = [sys.executable, __file__, "--measure"]
    proc = subprocess.run(cmd, input=json.dumps(request), capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        return {"config": config, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"config": config, "load": f"{before} -> {load_average()}", **result}


def child() -> None:
    request = json.load(sys.stdin)
    engine, variant, threads = request["config"].split(":")[:3]
    if engine == "hf":
        result = run_hf(request["target"], variant, int(threads), request["ids"], request["new"], request["reps"])
    else:
        extra = engine == "ggufx"
        result = run_gguf(request["target"], int(threads), request["ids"], request["new"], request["reps"], extra)
    print(json.dumps(result))


def check_configs(names: list[str], parser: argparse.ArgumentParser) -> None:
    types = {"hf": ("fp32", "bf16"), "gguf": ("f16", "q8_0", "q4_k_m"), "ggufx": ("f16", "q8_0", "q4_k_m")}
    for name in names:
        parts = name.split(":")
        ok = len(parts) in (3, 4) and parts[0] in types and parts[1] in types[parts[0]] and parts[2].isdigit()
        if not ok or (len(parts) == 4 and parts[3] not in POLICIES):
            parser.error(
                f"--configs: {name!r} is not ENGINE:TYPE:THREADS[:WAIT] (hf:fp32|bf16, gguf|ggufx:f16|q8_0|q4_k_m; "
                f"WAIT: {', '.join(POLICIES)})"
            )


def table(runs: list[dict], new: int) -> list[str]:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["config"], []).append(r)
    ok = {n: [r for r in rs if "error" not in r] for n, rs in by.items()}
    rate = {n: statistics.median(r["tok_s"] for r in rs) for n, rs in ok.items() if rs}
    rate_cpu = {n: statistics.median(r["tok_per_cpu_s"] for r in rs) for n, rs in ok.items() if rs}
    fp32 = [n for n in rate if n.startswith("hf:fp32")]
    # transformers as infer.py runs it on 2 cores (OMP_WAIT_POLICY=PASSIVE), else the spinning bf16 run
    bf16_reference = "hf:bf16:2:passive" if "hf:bf16:2:passive" in rate else "hf:bf16:2"
    reference = ok[fp32[0]][0]["ids"] if fp32 else None
    lines = [
        "| engine | type | threads | OpenMP wait | runs | tok/s (end to end) | decode tok/s | first token ms "
        f"| tok per CPU-s | x hf fp32 (wall / CPU) | x {bf16_reference} (wall / CPU) | tokens = hf fp32 |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rs in by.items():
        engine, variant, threads = name.split(":")[:3]
        good = ok[name]
        if not good:
            lines.append(f"| {engine} | {variant} | {threads} | {policy(name)} | 0 | failed: {rs[0]['error'][:100]} |")
            continue

        def ratio(base: str) -> str:
            base = base if base in rate else next((n for n in rate if n.startswith(base)), "")
            if not base:
                return "n/a"
            return f"{rate[name] / rate[base]:.1f} / {rate_cpu[name] / rate_cpu[base]:.1f}"

        same = "n/a"
        if reference is not None:
            ids = good[0]["ids"]
            same = next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b), min(len(ids), len(reference)))
            same = f"{same}/{new}"
        lines.append(
            f"| {engine} | {variant} | {threads} | {policy(name)} | {len(good)} | {rate[name]:.1f} | "
            f"{statistics.median(r['decode_tok_s'] for r in good):.1f} | "
            f"{statistics.median(r['first_token_s'] for r in good) * 1000:.0f} | {rate_cpu[name]:.1f} | "
            f"{ratio('hf:fp32:2')} | {ratio(bf16_reference)} | {same} |"
        )
    return lines


def per_run(runs: list[dict]) -> list[str]:
    """Every run in the order it ran, with the load average (1, 5, 15 min) before and after it."""
    lines = ["| # | config | tok/s | load before -> after |", "|---:|---|---:|---|"]
    for i, r in enumerate(runs, 1):
        rate = "failed" if "error" in r else f"{r['tok_s']:.1f}"
        lines.append(f"| {i} | {r['config']} | {rate} | {r.get('load', '')} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help="comma list of ENGINE:TYPE:THREADS[:WAIT]; WAIT is passive, spin or spin10k",
    )
    parser.add_argument("--model", help="an HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--gguf_dir", help="where the GGUFs go (reused when present); default: a temp folder")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3, help="timed generations per run (the median is reported)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per config; odd rounds go in reverse order")
    parser.add_argument("--json", help="also write every run here")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        child()
        return

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    check_configs(names, parser)
    from titletune import base_models

    started = time.perf_counter()
    print(f"load average before: {load_average()}", file=sys.stderr)
    model_dir = Path(args.model) if args.model else base_models.embedded_hf_dir()
    tmp, sizes = None, ""
    if any(n.startswith("gguf") for n in names):
        gguf_dir = Path(args.gguf_dir) if args.gguf_dir else Path(tmp := tempfile.mkdtemp(prefix="bench_infer_"))
        ggufs = make_ggufs(model_dir, gguf_dir)
        sizes = ", ".join(f"{q} {p.stat().st_size / 1e6:.0f} MB" for q, p in ggufs.items())
    ids = prompt_ids(str(model_dir))
    runs = []
    try:
        for k in range(args.rounds):
            for name in names if k % 2 == 0 else names[::-1]:
                engine, variant = name.split(":")[:2]
                target = str(model_dir) if engine == "hf" else str(ggufs[variant])
                runs.append(run_child(name, target, ids, args))
                r = runs[-1]
                brief = r.get("error") or f"{r['tok_s']:.1f} tok/s (decode {r['decode_tok_s']:.1f})"
                print(f"round {k + 1} {name}: {brief}  (load {r.get('load', load_average())})", file=sys.stderr)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\n{model_dir.name}: prompt {len(ids)} tokens, {args.max_new_tokens} new tokens greedy, batch 1, "
        f"median of {args.reps} after 1 warm-up, {args.rounds} round(s); Python {platform.python_version()}"
        + (f"; GGUF sizes: {sizes}" if sizes else "")
    )
    print(f"load average at the end: {load_average()}; wall {time.perf_counter() - started:.0f} s\n")
    print("\n".join(table(runs, args.max_new_tokens)))
    print()
    print("\n".join(per_run(runs)))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "prompt_ids": ids}, indent=1))


if __name__ == "__main__":
    main()
