"""Load a trained run for inference and answer questions with the base model, the tuned model, or both.

Two engines with the same small surface (`generate`, and `loss` where the engine has logits), chosen by `load_engine`:
- `hf_engine.TransformersEngine`: one base model in memory plus the LoRA adapter; base answers come from the same
  weights with the adapter switched off (`disable_adapter()`), so the model is loaded once. Or the run's merged/ folder.
- `LlamaCppEngine` (here): GGUF files through llama-cpp-python, which renders the chat template embedded in the GGUF.
  What it shares with the server (titletune/serve/) is here once: which GGUF answers as which model (`gguf_files`),
  the sampling settings as llama.cpp's arguments (`Sampling.llama_cpp`, from sampling.py) and the token estimate of
  messages without a rendered template (`message_tokens`); the context both open is llamacpp.N_CTX.
Questions always go through the run's own prompts/ (system prompt included) and the tokenizer's chat template,
exactly as in training. Before any template renders them, every message is rebuilt from its role and content and the
content is made plain text for that model's own special tokens (specials.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from titletune import base_models, hf_engine, llamacpp, machine, prompts, specials
from titletune.config import RAG_K
from titletune.errors import UserError
from titletune.runs import Run
from titletune.sampling import MODELS, Sampling

# ---------------------------------------------------------------- llama.cpp


class LlamaCppEngine:
    """GGUF files through llama-cpp-python; the chat template is the one embedded in each GGUF."""

    name = "llamacpp"
    supports_loss = False

    def __init__(
        self,
        run: Run,
        systems: tuple[str, ...] = MODELS,
        gguf: str | Path | None = None,
        base_gguf: str | Path | None = None,
        threads: int | None = None,
        n_ctx: int = llamacpp.N_CTX,
    ):
        self.run = run
        self.systems = tuple(systems)
        self.threads = threads or machine.llama_threads()
        self.n_ctx = n_ctx
        self.paths = gguf_files(run, gguf, base_gguf, self.systems)
        if "base" in self.systems and "base" not in self.paths:
            raise UserError(
                f"base answers with --engine llamacpp need a GGUF of the base model {run.config['base_model']}; "
                "pass --base-gguf FILE, or --only tuned, or --engine transformers."
            )
        self.llms = {system: self._load(path) for system, path in self.paths.items()}
        self.specials = {system: specials.from_llama(llm) for system, llm in self.llms.items()}

    @property
    def context(self) -> int:
        return self.n_ctx

    def prompt_tokens(self, conversation: list[dict]) -> int:
        """The messages' tokens in the GGUF's own vocabulary, plus a few per message for the chat template's
        markers. Text is tokenized as text (special=False), as llama.cpp's chat path does with message content."""
        system, llm = next(iter(self.llms.items()))
        return message_tokens(llm, self.specials[system].messages(conversation))

    def _load(self, path: Path):
        return llamacpp.load(path, n_ctx=self.n_ctx, threads=self.threads)

    def generate(
        self,
        conversations: list[list[dict]],
        system: str = "tuned",
        sampling: Sampling | None = None,
        batch_size: int = 1,
        progress: bool = False,
    ) -> list[str]:
        """One answer per conversation (llama-cpp-python answers one at a time)."""
        sampling = (sampling or Sampling()).for_run(self.run)
        sampling.check()
        if sampling.num_beams != 1:
            raise UserError("--num-beams works only with --engine transformers; llama.cpp has no beam search.")
        if system not in self.llms:
            raise ValueError(f"engine was loaded without {system!r} (systems={self.systems})")
        llm = self.llms[system]
        answers = []
        for conv in _tqdm(conversations, desc=f"{system} answers", disable=not progress):
            out = llm.create_chat_completion(
                # Made plain before rendering: llama-cpp-python tokenizes the rendered prompt, specials parsed.
                messages=self.specials[system].messages(conv),
                seed=0,
                **sampling.llama_cpp(),
            )
            answers.append((out["choices"][0]["message"]["content"] or "").strip())
        return answers


def message_tokens(llm, messages: list[dict]) -> int:
    """The messages' tokens in a GGUF's own vocabulary (llm: a llama_cpp.Llama), plus a few per message for the chat
    template's markers. Text is tokenized as text (special=False), as llama.cpp's chat path does with message
    content; the messages must already be plain text for the model's special tokens (specials.py)."""
    text = sum(len(llm.tokenize(m["content"].encode(), add_bos=False, special=False)) for m in messages)
    return text + 8 * len(messages) + 8


def gguf_files(
    run: Run | None, gguf: str | Path | None, base_gguf: str | Path | None, systems: tuple[str, ...] = MODELS
) -> dict[str, Path]:
    """The GGUF that answers as each of `systems`, as the llama.cpp engine and the server choose it. Tuned: `gguf`,
    else the run's. Base: `base_gguf`, else the embedded GGUF when the run's base is the embedded model; left out when
    there is neither (the caller says what to pass)."""
    paths: dict[str, Path] = {}
    if "tuned" in systems:
        paths["tuned"] = check_gguf(gguf) if gguf else run.gguf()
    if "base" in systems:
        if base_gguf:
            paths["base"] = check_gguf(base_gguf)
        elif run is not None and run.is_embedded:
            paths["base"] = base_models.embedded_gguf()
    return paths


def check_gguf(path: str | Path) -> Path:
    """A GGUF path that exists and starts with the GGUF magic bytes."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"GGUF file {path} does not exist; check the path (train.py writes "
            "outputs/<run>/model.<type>.gguf: q8_0 on CPU, q4_k_m with a GPU preset), or leave --gguf out to use the "
            "run's own."
        )
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes).")
    return path


@dataclass(frozen=True)
class EngineOptions:
    """How load_engine loads a run's models, past the engine and the systems (infer.py's flags; the defaults load the
    run's own adapter or GGUF)."""

    use_merged: bool = False  # transformers: merged/ instead of the base with adapter/
    gguf: str | Path | None = None  # llamacpp: the tuned GGUF, else the run's
    base_gguf: str | Path | None = None  # llamacpp: the base GGUF, else the embedded model's when the run's base is it
    threads: int | None = None  # llamacpp: CPU threads, else machine.llama_threads()
    dtype: str = "auto"  # transformers: the dtype to load in, else what training used
    trust_remote_code: bool = False  # the command's own --trust-remote-code; a GGUF runs no Python


def load_engine(
    run: Run, engine: str = "transformers", systems: tuple[str, ...] = MODELS, options: EngineOptions | None = None
):
    """TransformersEngine or LlamaCppEngine for a run, loading only what `systems` needs. options.trust_remote_code:
    the command's own --trust-remote-code (a GGUF runs no Python, so only transformers reads it)."""
    o = options or EngineOptions()
    bad = [s for s in systems if s not in MODELS]
    if bad or not systems:
        raise UserError(f"systems must be among {MODELS}, got {systems}.")
    if engine == "transformers":
        if o.gguf or o.base_gguf:
            raise UserError("--gguf/--base-gguf need --engine llamacpp.")
        return hf_engine.TransformersEngine(run, systems, o.use_merged, o.dtype, o.trust_remote_code)
    if engine == "llamacpp":
        if o.use_merged:
            raise UserError("--use-merged needs --engine transformers; with llamacpp pass --gguf FILE.")
        return LlamaCppEngine(run, systems=systems, gguf=o.gguf, base_gguf=o.base_gguf, threads=o.threads)
    raise UserError(f"--engine must be transformers or llamacpp, got {engine!r}.")


def ask(
    engine,
    questions: list[str],
    systems: tuple[str, ...] = MODELS,
    sampling: Sampling | None = None,
    progress: bool = False,
    index=None,
    k: int = RAG_K,
) -> dict[str, list]:
    """Answers per system for plain questions, each wrapped in the run's prompts (system prompt included). With a
    search index (retrieval.Index), also "<model>+rag" (the tuned model, or the only one asked, answering with the top
    k catalogue entries in its prompt) and "retrieved" (their titles, per question)."""
    ps = engine.run.prompts
    conversations = [prompts.messages(ps.system, q) for q in questions]
    sampling = (sampling or Sampling()).for_run(engine.run)
    hits = [index.search(q, k) for q in questions] if index is not None else None
    grounded = [prompts.rag_messages(ps, q, h) for q, h in zip(questions, hits, strict=True)] if hits else []
    for conv in conversations:
        check_length(engine, conv, sampling.max_new_tokens)
    for conv, found in zip(grounded, hits or [], strict=True):
        check_length(engine, conv, sampling.max_new_tokens, entries=len(found), k=k)
    out: dict[str, list] = {s: engine.generate(conversations, s, sampling, progress=progress) for s in systems}
    if index is not None:
        model = "tuned" if "tuned" in systems else systems[0]
        out[f"{model}+rag"] = engine.generate(grounded, model, sampling, progress=progress)
        out["retrieved"] = [[h["title"] for h in found] for found in hits]
    return out


def check_length(
    engine, conversation: list[dict], max_new_tokens: int, entries: int | None = None, k: int | None = None
) -> None:
    """Refuse, before generating, a prompt that leaves no room for the answer in the model's context: llama.cpp
    would raise mid-session, and transformers would spend minutes past its position limit producing garbage.

    entries: for a RAG prompt, how many catalogue entries it holds (k: the --rag-k that asked for them); then the
    message blames those, since the question alone was checked first."""
    room = engine.context - max_new_tokens
    used = engine.prompt_tokens(conversation)
    if used <= room:
        return
    reads = f"this model reads {engine.context:,} tokens including the {max_new_tokens} it may answer with"
    if entries is None:
        chars = len(conversation[-1]["content"])
        raise UserError(
            f"the question is too long: {chars:,} characters, {used:,} tokens with the prompt, and {reads} "
            "(--max-new-tokens). Shorten the question to a product title or a sentence about it."
        )
    fix = f"lower --rag-k (now {k})" if (k or entries) > 1 else "lower --max-new-tokens"
    raise UserError(
        f"the {entries:,} retrieved catalogue entries are too long for the model: with them the prompt takes "
        f"{used:,} tokens, and {reads} (--max-new-tokens). Fix: {fix}."
    )


def perplexity(nll: float, tokens: int) -> tuple[float | None, float | None]:
    """(mean loss, perplexity) from summed NLL; (None, None) when there were no tokens."""
    if tokens == 0:
        return None, None
    loss = nll / tokens
    return loss, math.exp(min(loss, 700.0))


def _tqdm(*args, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(*args, **kwargs)
