"""Export fidelity: every GGUF measured against merged/, the model it came from, on the run's own products.

1. Template round trip (roundtrip.py): llama.cpp's rendering and tokenization of the chats against transformers',
   and the end token. Any difference fails the export with its cause and fix.
2. Parity per file, on N test and N train products: greedy answers against merged/'s (identical share, agreeing
   prefix), perplexity of the reference description next to merged/'s, mean KL divergence of the next-token
   distributions on the reference tokens (KL(merged || file), as llama-perplexity --kl-divergence measures it),
   ROUGE-L of the answers against the reference, and tokens/s.

Cost (the export runs it every time, so it is kept to about a third of the export on CPU; bench/bench_export.py):
merged/'s side (`reference`) needs only merged/, so export runs it beside the converter. llama.cpp then measures each
file in its own child process as soon as the file is written (`Parity`), the 16-bit one while the quants are made, as
many at once as there are cores; in each, every product's teacher-forced passes go in one multi-sequence batch, and
the file's own answers are generated for all products at once.

llama.cpp runs in a child process (`python -m titletune.llamacpp_child`): it aborts the whole process on some broken files,
and after hours of training that must be an error, not a crash.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from titletune import llamacpp, machine, teacher
from titletune.errors import UserError
from titletune.llamacpp_child import first_difference

# llama_cpp is imported only in the child (see export.py: libgomp reads OMP_WAIT_POLICY once, when it loads).

log = logging.getLogger(__name__)

# Thresholds, from the measured spread (bench/README.md, "Export fidelity": the thresholds). A 16-bit file must stay
# within F16_MAX_KL (10x the worst 16-bit file measured) and give at least F16_MIN_IDENTICAL identical answers: one
# near-tie flipping a token is rounding, half of them is a broken file. A quant above QUANT_WARN_KL (2x q4_k_m's
# worst) gets a warning: it still loads, but answers noticeably unlike merged/.
F16_MAX_KL = 0.005
F16_MIN_IDENTICAL = 0.5
QUANT_WARN_KL = 0.1


@dataclass
class Sample:
    """One product the files are measured on: the prompt messages and the reference description."""

    split: str
    messages: list[dict]
    reference: str


def samples(splits: dict[str, list[dict]], n: int) -> list[Sample]:
    """The first n rows of each split (the splits are already shuffled by the prepare stage), as Samples."""
    out = []
    for split, rows in splits.items():
        for row in rows[:n]:
            out.append(Sample(split, row["prompt"], row["completion"][-1]["content"]))
    return out


# ---------------------------------------------------------------------------------------------- the reference


def end_token(tokenizer, sample: Sample) -> tuple[int, list[int], list[int]]:
    """(the token the model was trained to end its answer with, prompt ids, answer ids up to and with that token).

    The training rendering is the tokenizer's chat template over prompt + completion (TRL's), so the end token is the
    first special token after the answer's text there: <|im_end|> for ChatML, <|eot_id|> for Llama 3, </s> for Mistral.
    """
    prompt_ids = prompt_tokens(tokenizer, sample.messages)
    full_text = tokenizer.apply_chat_template(
        sample.messages + [{"role": "assistant", "content": sample.reference}], tokenize=False
    )
    full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if full[: len(prompt_ids)] != prompt_ids:
        raise UserError(
            "the chat template renders a conversation's prompt differently once the answer follows it, so the "
            "answer's tokens cannot be told apart; fidelity needs a template whose prompt is a prefix of the chat."
        )
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)
    }
    answer = full[len(prompt_ids) :]
    at = next((i for i, tok in enumerate(answer) if tok in special), None)
    if at is None:
        raise UserError(
            "the chat template ends an assistant turn with no special token, so generation would never stop; "
            "give the tokenizer a chat template that closes each turn (and set that token as eos_token)."
        )
    return answer[at], prompt_ids, answer[: at + 1]


def prompt_tokens(tokenizer, messages: list[dict]) -> list[int]:
    """transformers' rendering of a prompt: the chat template with the generation prompt, tokenized as TRL does."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenized(tokenizer, chosen: list[Sample], answer_tokens: int) -> tuple[int, list[dict]]:
    """(the end token, one row per sample: split, prompt ids, the reference's first answer_tokens ids, reference text),
    tokenized here so that `reference` needs no tokenizer and can run beside the converter."""
    rows, end = [], None
    for sample in chosen:
        end, prompt_ids, answer_ids = end_token(tokenizer, sample)
        rows.append(
            {
                "split": sample.split,
                "prompt_ids": prompt_ids,
                "answer_ids": answer_ids[:answer_tokens],
                "reference": sample.reference,
            }
        )
    return end, rows


def reference(merged_dir: Path, end: int, rows: list[dict], max_tokens: int, folder: Path, threads: int | None = None):
    """merged/ in transformers on every prepared row (`tokenized`): greedy answer ids (up to max_tokens, stopping at the
    end token), the reference's per-token NLL, and its next-token log-probabilities, saved to `folder` for the child's
    KL. Both passes are one batch each. `threads`: torch's CPU threads meanwhile (export runs this beside the
    converter, on the cores it leaves).

    Loaded in float32 on CPU (the 16-bit weights upcast exactly), in its own dtype on a GPU.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if device == "cpu" else "auto"
    started = time.perf_counter()
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype, use_safetensors=True).to(device).eval()
        rows, logprobs = _teacher_forced(model, rows, end)
        answers, gen_seconds = _greedy(model, rows, end, max_tokens, device)
    finally:
        torch.set_num_threads(before)
    generated = 0
    for row, ids in zip(rows, answers, strict=True):
        row["greedy"] = ids[: ids.index(end) + 1] if end in ids else ids
        generated += len(row["greedy"])
    path = folder / "merged_logprobs.npz"
    np.savez(path, *logprobs)
    del model
    return {
        "rows": rows,
        "end": end,
        "logprobs": str(path),
        "max_tokens": max_tokens,
        "seconds": round(time.perf_counter() - started, 2),
        "tokens_per_second": round(generated / max(gen_seconds, 1e-9), 1),
    }


def _teacher_forced(model, rows: list[dict], end: int) -> tuple[list[dict], list]:
    """(copies of the rows with the reference's per-token NLL as "nll", the next-token log-probabilities on its
    tokens, as float16 arrays), from merged/ teacher-forced on the references, all in one batch."""
    import numpy as np
    import torch

    rows = [dict(r) for r in rows]
    logprobs = []
    with torch.no_grad():
        examples = [(r["prompt_ids"] + r["answer_ids"], len(r["prompt_ids"])) for r in rows]
        for r, lp in zip(rows, teacher.answer_logprobs(model, examples, end, len(rows)), strict=True):
            r["nll"] = teacher.answer_nll(lp, r["answer_ids"]).cpu().tolist()
            logprobs.append(lp.cpu().numpy().astype(np.float16))  # 2 bytes a value; KL's error from it is ~1e-5
    return rows, logprobs


def _greedy(model, rows: list[dict], end: int, max_tokens: int, device: str) -> tuple[list[list[int]], float]:
    """(merged/'s greedy answer ids per row, up to max_tokens and past the end token, seconds generating)."""
    import torch

    # Greedy answers in one left-padded batch (6x faster on CPU than one by one; the mask keeps them the same).
    width = max(len(r["prompt_ids"]) for r in rows)
    batch = torch.tensor([[end] * (width - len(r["prompt_ids"])) + r["prompt_ids"] for r in rows], device=device)
    mask = torch.tensor(
        [[0] * (width - len(r["prompt_ids"])) + [1] * len(r["prompt_ids"]) for r in rows], device=device
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            batch,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_tokens,
            eos_token_id=end,
            pad_token_id=end,
        )
    gen_seconds = time.perf_counter() - t0
    return out[:, width:].tolist(), gen_seconds


# ------------------------------------------------------------------------------------------------------ parity


class Parity:
    """llama.cpp's side of the check, started for each file as soon as it is written: one child process per file, as
    many at once as there are cores, each on its share of them. The 16-bit file is written first, so its child runs
    while the quants are made. Two files at once on one thread each beat one after the other on two: the large
    teacher-forced batch gains little from a second thread, and a file's token by token steps leave the other core
    idle (bench/README.md, "Export fidelity"). A context manager: leaving it waits for children still running."""

    def __init__(self, ref: dict, files: int):
        self.ref = ref
        workers = max(1, min(files, machine.cpus()))
        share = max(1, min(machine.MAX_LLAMA_THREADS, machine.cpus() // workers))
        self.request = {
            "op": "parity",
            "reference": ref,
            "threads": min(share, machine.llama_threads()),
            "batch_threads": share,
        }
        self.pool = ThreadPoolExecutor(workers)
        self.futures: list = []

    def start(self, path: Path) -> None:
        self.futures.append(self.pool.submit(child, path, {**self.request, "paths": [str(path)]}))

    def results(self) -> list[dict]:
        """Every started file's numbers (`against_merged`), in the order they were started."""
        return against_merged([f.result()["files"][0] for f in self.futures], self.ref)

    def __enter__(self) -> Parity:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def against_merged(results: list[dict], ref: dict) -> list[dict]:
    """The children's parity results as each file's numbers against merged/; the answers' ROUGE-L against the
    reference. "verify": the file's answer to the first train product's question (the run's own example question),
    with its tokens and seconds."""
    from titletune import metrics

    rows = ref["rows"]
    nll_merged = [x for r in rows for x in r["nll"]]
    first_train = next((i for i, r in enumerate(rows) if r["split"] == "train"), 0)
    out = []
    for got in results:
        agree = [first_difference(g, r["greedy"]) for g, r in zip(got["greedy"], rows, strict=True)]
        identical = [g == r["greedy"] for g, r in zip(got["greedy"], rows, strict=True)]
        nll_file = [x for per in got["nll"] for x in per]
        answers = got["answers"]
        rouge = metrics.per_answer(answers, [r["reference"] for r in rows], [""] * len(rows))["rougeL"]
        verify_tokens = len([t for t in got["greedy"][first_train] if t != ref["end"]])
        out.append(
            {
                "prompts": len(rows),
                "max_tokens": ref["max_tokens"],
                "identical": round(sum(identical) / len(rows), 3),
                "agreeing_prefix": round(sum(agree) / len(rows), 1),
                "perplexity": round(math.exp(sum(nll_file) / len(nll_file)), 3),
                "perplexity_merged": round(math.exp(sum(nll_merged) / len(nll_merged)), 3),
                "kl_divergence": round(sum(got["kl"]) / len(got["kl"]), 6),
                "kl_divergence_max": round(max(got["kl"]), 6),
                "rougeL": round(sum(rouge) / len(rouge), 3),
                "tokens_per_second": round(got["tokens"] / max(got["seconds"], 1e-9), 1),
                "seconds": round(got["file_seconds"], 2),
                "answers": answers,
                "verify": {  # its seconds: at the file's measured tokens/s (the answers are generated together)
                    "answer": answers[first_train],
                    "tokens": verify_tokens,
                    "seconds": round(verify_tokens * got["seconds"] / max(got["tokens"], 1), 3),
                },
            }
        )
    return out


def judge(gguf_type: str, measures: dict) -> str | None:
    """A UserError for a 16-bit file unlike merged/; a warning (returned) for a quant far from it; else None."""
    sixteen = gguf_type in ("f16", "bf16")
    if sixteen and (measures["kl_divergence"] > F16_MAX_KL or measures["identical"] < F16_MIN_IDENTICAL):
        raise UserError(
            f"model.{gguf_type}.gguf answers unlike merged/, the model it was converted from: mean KL divergence "
            f"{measures['kl_divergence']:.4g} (limit {F16_MAX_KL}), identical greedy answers {measures['identical']:.0%} "
            f"(at least {F16_MIN_IDENTICAL:.0%}), perplexity {measures['perplexity']} vs merged/ "
            f"{measures['perplexity_merged']}. A 16-bit conversion should be nearly lossless: the converter misread a "
            "weight or the architecture. Update llama-cpp-python (its converter), or pass --llama-cpp-dir."
        )
    if not sixteen and measures["kl_divergence"] > QUANT_WARN_KL:
        return (
            f"model.{gguf_type}.gguf is far from merged/: mean KL divergence {measures['kl_divergence']:.3g} "
            f"(above {QUANT_WARN_KL}), perplexity {measures['perplexity']} vs {measures['perplexity_merged']}; "
            "a larger quant (q8_0, q6_k) keeps more of the fine-tune."
        )
    return None


# ------------------------------------------------------------------------------------------------------ child


def child(gguf_path: Path, request: dict) -> dict:
    """One llama.cpp session on `gguf_path` in a child process; its one JSON line. A crash is a UserError.

    A child, because llama.cpp aborts the whole process on some broken files (a GGUF whose tokenizer the converter
    misread died with std::out_of_range in byte_to_token); after hours of training that must be an error, not a crash.
    """
    batch_threads = max(1, min(machine.MAX_LLAMA_THREADS, machine.cpus()))
    request = {"threads": machine.llama_threads(), "batch_threads": batch_threads, **request, "path": str(gguf_path)}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")) if p
    )
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:  # a reference can be megabytes
        json.dump(request, f)
    try:
        cmd = [sys.executable, "-m", "titletune.llamacpp_child", f.name]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    finally:
        os.unlink(f.name)
    if result.returncode != 0:
        tail = "\n".join([line for line in result.stderr.strip().splitlines() if line.strip()][-6:]) or "no output"
        names = ", ".join(Path(p).name for p in request.get("paths") or [gguf_path])
        crashed = llamacpp.crash(result.returncode)
        if crashed and llamacpp.not_the_file(result.returncode):  # the export keeps the files and says so
            raise EngineCrash(f"{crashed} (it was measuring {names}).\n{tail}")
        how = crashed or f"exit {result.returncode}"  # llama.cpp aborts on some broken files (SIGABRT)
        raise UserError(f"{names} failed in llama.cpp ({how}), so the GGUF export is broken:\n{tail}")
    return json.loads(result.stdout.strip().splitlines()[-1])


class EngineCrash(UserError):
    """llama.cpp died by a signal while measuring a GGUF: the engine or this machine failed, not the file."""
