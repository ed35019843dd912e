"""What runs inside llama.cpp's own process: `python -m titletune.llamacpp_child request.json` prints one JSON line.

fidelity.child starts it, because llama.cpp aborts the whole process on some broken files, and after hours of training
that must be an error, not a crash. Its three operations:

- render: the prompt ids llama.cpp's chat handler makes of each conversation, and the GGUF's metadata and end tokens
  (roundtrip.round_trip compares them with transformers' rendering);
- parity: each file's greedy answers, teacher-forced NLL and KL against merged/'s reference (fidelity.Parity);
- answer: a GGUF's metadata and, given messages, its greedy answer (export.read_metadata, export.verify).

Nothing here imports titletune's upper layers or the parent's libraries (torch, transformers): llama_cpp is imported
inside the functions, after titletune/__init__.py has set the OpenMP wait policy (machine.passive_openmp).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

from titletune import llamacpp

# tokens/s: this many greedy tokens of one answer, one at a time, as a chat generates them; the parity answers are
# generated for all products at once, which is not a user's speed.
SPEED_TOKENS = 16


class Step(NamedTuple):
    """One token of a llama_decode batch: its position, the sequences it belongs to, and whether its logits are kept
    (under `key`: (row, j) for the reference's j-th answer token of row < n, (n + row, j) for merged/'s greedy one)."""

    token: int
    pos: int
    seqs: tuple[int, ...]
    logits: bool = False
    key: tuple[int, int] | None = None


def first_difference(a: list[int], b: list[int]) -> int:
    """The first position where two id lists differ (the shorter one's length when one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(request_path: str) -> None:
    """The request's operation (see the module docstring) -> one JSON line on stdout."""
    request = json.loads(Path(request_path).read_text())
    op = request["op"]
    if op == "render":
        out = _render(request)
    elif op == "parity":
        import llama_cpp

        out = {"files": []}
        for path in request["paths"]:
            print(f"measuring {Path(path).name}", file=sys.stderr, flush=True)  # a crash's last line names the file
            out["files"].append(Parity(llama_cpp, {**request, "path": path}).measure())
    elif op == "answer":
        out = _answer(request)
    else:
        raise SystemExit(f"unknown op {op!r}")
    print(json.dumps(out))


# ------------------------------------------------------------------------------------------------ render, answer


class _Captured(Exception):
    pass


def _render(request: dict) -> dict:
    llm = llamacpp.load(request["path"], vocab_only=True)
    out = {
        "metadata": dict(llm.metadata),
        "chat_format": llm.chat_format if llm.chat_handler is None else "custom handler",
        "rendered": [_rendered(llm, conv) for conv in request["conversations"]],
        "tokenized": [llm.tokenize(t.encode(), add_bos=False, special=True) for t in request["texts"]],
    }
    ids = {
        int(llm.metadata[k])
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
        if k in llm.metadata
    }
    out["tokens"] = {str(i): llm.detokenize([i], special=True).decode(errors="replace") for i in ids}
    return out


def _rendered(llm, messages: list[dict]) -> list[int]:
    """The prompt ids create_chat_completion would evaluate for `messages`: its chat handler is run for real and
    stopped at the point where it hands the tokens to create_completion."""
    seen = {}

    def capture(prompt, *args, **kwargs):
        seen["ids"] = list(prompt)
        raise _Captured

    llm.create_completion = capture  # an instance attribute: the class's method is untouched
    try:
        llm.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)
    except _Captured:
        pass
    finally:
        del llm.create_completion
    return seen["ids"]


def _answer(request: dict) -> dict:
    messages = request["messages"]
    llm = llamacpp.load(request["path"], threads=request["threads"], vocab_only=not messages)
    out = {"metadata": dict(llm.metadata)}
    if messages:
        started = time.perf_counter()
        reply = llm.create_chat_completion(messages=messages, max_tokens=request["max_tokens"], temperature=0.0)
        out.update(
            answer=reply["choices"][0]["message"]["content"].strip(),
            tokens=reply["usage"]["completion_tokens"],
            seconds=time.perf_counter() - started,
        )
    llm.close()
    return out


# ------------------------------------------------------------------------------------------------------ parity


class Parity:
    """The numbers of one file: every product's teacher-forced passes in one multi-sequence batch, then the file's
    own greedy answers generated for all products at once, from where each parts from merged/'s.

    Sequence i holds product i's prompt and reference answer (perplexity, KL), sequence n + i its prompt and merged/'s
    greedy answer (agreement): the shared prompt start and each prompt belong to both. The argmax along merged/'s
    greedy answer gives the agreeing prefix exactly (both engines are deterministic, so they agree up to the first
    position where the argmax differs); only from there is the file's own answer generated."""

    def __init__(self, llama_cpp, request: dict):
        self.lib, self.request = llama_cpp, request
        ref = request["reference"]
        self.ref, self.rows, self.end, self.max_tokens = ref, ref["rows"], ref["end"], ref["max_tokens"]
        self.n = len(self.rows)

    def measure(self) -> dict:
        import numpy as np

        started = time.perf_counter()
        self.llm = llamacpp.load(self.request["path"], n_ctx=64)  # the weights and the vocabulary
        plan = self.plan()
        self.open(len(plan))
        logits = dict(zip((s.key for s in plan if s.logits), self.decode(plan), strict=True))
        # Every core for the one large batch above; one thread for the steps below, a few tokens each (waking the
        # other threads costs more than they add there: bench/README.md, "Export fidelity").
        self.ctx.set_n_threads(self.request["threads"], self.request["threads"])
        merged = np.load(self.ref["logprobs"])
        nll, kl, greedy = self.score(logits, merged)
        self.continue_answers(greedy)
        seconds = self.speed()
        answers = [
            self.llm.detokenize([t for t in o if t != self.end]).decode(errors="replace").strip() for o in greedy
        ]
        self.ctx.close()
        self.llm.close()
        return {
            "greedy": greedy,
            "answers": answers,
            "nll": nll,
            "kl": kl,
            "tokens": SPEED_TOKENS,
            "seconds": seconds,
            "file_seconds": time.perf_counter() - started,
        }

    def plan(self) -> list[Step]:
        """The one batch of teacher-forced steps: the shared prompt start once, then each product's prompt and answer
        in both of its sequences up to where merged/'s greedy answer leaves the reference, then each alone."""
        rows, n = self.rows, self.n
        shared = min(len(r["prompt_ids"]) for r in rows) - 1  # the chat template and system message: evaluated once
        for r in rows[1:]:
            shared = min(shared, first_difference(r["prompt_ids"], rows[0]["prompt_ids"]))
        every = tuple(range(2 * n))
        plan = [Step(tok, pos, every) for pos, tok in enumerate(rows[0]["prompt_ids"][:shared])]
        for i, r in enumerate(rows):
            prompt, answer, g = r["prompt_ids"], r["answer_ids"], r["greedy"]
            p = len(prompt)
            same = min(first_difference(g, answer), len(answer) - 1)
            both = (i, n + i)
            plan += [Step(tok, pos, both) for pos, tok in enumerate(prompt[:-1]) if pos >= shared]
            plan.append(Step(prompt[-1], p - 1, both, True, (i, 0)))  # predicts answer[0] and g[0]
            for j, tok in enumerate(answer[:-1]):
                plan.append(Step(tok, p + j, both if j < same else (i,), True, (i, j + 1)))
            for j in range(same, len(g) - 1):
                plan.append(Step(g[j], p + j, (n + i,), True, (n + i, j + 1)))
        return plan

    def open(self, planned: int) -> None:
        """A context with room for the plan, every answer and the speed run, one sequence per row and side."""
        from llama_cpp import _internals

        threads = self.request["threads"]
        params = type(self.llm.context_params).from_buffer_copy(self.llm.context_params)
        params.n_ctx = planned + self.n * (self.max_tokens + 1) + SPEED_TOKENS + 16
        params.n_batch, params.n_ubatch = planned, min(planned, 512)
        params.n_seq_max, params.kv_unified = 2 * self.n, True
        params.n_threads, params.n_threads_batch = threads, self.request.get("batch_threads", threads)
        self.ctx = _internals.LlamaContext(model=self.llm._model, params=params, verbose=False)
        self.memory = self.lib.llama_get_memory(self.ctx.ctx)
        self.vocab = self.llm.n_vocab()

    def decode(self, steps: list[Step]) -> list:
        """One llama_decode of the steps; the logits rows asked for, in order."""
        import numpy as np
        from llama_cpp import _internals

        batch = _internals.LlamaBatch(n_tokens=len(steps), embd=0, n_seq_max=2 * self.n)
        b = batch.batch
        for j, step in enumerate(steps):
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = step.token, step.pos, len(step.seqs), step.logits
            for k, s in enumerate(step.seqs):
                b.seq_id[j][k] = s
        b.n_tokens = len(steps)
        self.ctx.decode(batch)
        out = [
            np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx.ctx, j), shape=(self.vocab,)).copy()
            for j, step in enumerate(steps)
            if step.logits
        ]
        batch.close()
        return out

    def score(self, logits: dict, merged) -> tuple[list[list[float]], list[float], list[list[int]]]:
        """Per row: the reference's NLL, KL(merged/ || file) per answer token, and the file's greedy answer as far as
        the plan's logits reach (its first own token included); rows to go on are left in self.live."""
        import numpy as np

        n, end = self.n, self.end
        greedy, nll, kl, self.live = [], [], [], {}
        for i, r in enumerate(self.rows):
            answer, g = r["answer_ids"], r["greedy"]
            same = min(first_difference(g, answer), len(answer) - 1)
            rows_ref = np.stack([logits[(i, j)] for j in range(len(answer))])
            lq = rows_ref - rows_ref.max(axis=1, keepdims=True)
            lq -= np.log(np.exp(lq).sum(axis=1, keepdims=True))
            nll.append([-float(lq[j, tok]) for j, tok in enumerate(answer)])
            lp = merged[f"arr_{i}"].astype(np.float32)
            kl.extend(float(x) for x in (np.exp(lp) * (lp - lq)).sum(axis=1, dtype=np.float64))
            preds = [int(np.argmax(logits[(i, j)] if j <= same else logits[(n + i, j)])) for j in range(len(g))]
            k = first_difference(preds, g)
            out = list(g) if k == len(g) else g[:k] + [preds[k]]
            if out[-1] != end and len(out) < self.max_tokens:
                # Sequence n + i keeps the prompt and the agreeing prefix; the file goes on from its own token.
                self.lib.llama_memory_seq_rm(self.memory, n + i, len(r["prompt_ids"]) + k, -1)
                self.live[i] = out
            greedy.append(out)
        return nll, kl, greedy

    def continue_answers(self, greedy: list[list[int]]) -> None:
        """The file's own answers (in `greedy`, in place), one token per unfinished product per step."""
        import numpy as np

        live = self.live
        while live:
            step = [
                Step(o[-1], len(self.rows[i]["prompt_ids"]) + len(o) - 1, (self.n + i,), True) for i, o in live.items()
            ]
            for (i, o), row in zip(list(live.items()), self.decode(step), strict=True):
                o.append(int(np.argmax(row)))
                if o[-1] == self.end or len(o) >= self.max_tokens:
                    del live[i]

    def speed(self) -> float:
        """Seconds for SPEED_TOKENS tokens of one answer, one at a time after its prompt, as a user sees it."""
        import numpy as np

        first = self.rows[0]["prompt_ids"]
        self.lib.llama_memory_seq_rm(self.memory, self.n, len(first) - 1, -1)  # from the prompt's last token
        tok, pos = first[-1], len(first) - 1
        t0 = time.perf_counter()
        for _ in range(SPEED_TOKENS):
            (row,) = self.decode([Step(tok, pos, (self.n,), True)])
            tok, pos = int(np.argmax(row)), pos + 1
        return time.perf_counter() - t0


if __name__ == "__main__":
    main(sys.argv[1])
