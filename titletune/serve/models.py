"""What the server holds: each model served loaded once in llama.cpp behind its own lock and queue (`Model`), the
catalogue index "tuned+rag" searches (`Rag`), and `Served`, everything the app serves, built by `load`.

"tuned+rag" is the tuned model (the same llama.cpp instance, lock and queue) asked as `infer.py ask --rag` asks it: the
last user message is searched in a catalogue index (retrieval.py) and replaced by the run's RAG prompt around the top
k entries (rag.txt, rag_entry.txt).

Limits (defaults and their reasons in config.py): at most --max-queue requests wait per model, beyond that 503 at
once; a request still waiting at its deadline (--request-timeout seconds after it arrived) gets 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import anyio

from titletune import engines, llamacpp, prompts, retrieval, sampling, specials
from titletune.config import RAG_K, DataArguments, cache_dir
from titletune.errors import UserError
from titletune.llamacpp import N_CTX
from titletune.runs import Run
from titletune.serve.protocol import ApiError, Chat

log = logging.getLogger(__name__)

EXAMPLES = 4  # example questions on the page, from the run's first train products
RAG = "tuned+rag"


class Model:
    """One GGUF in llama.cpp, behind its own lock, with a bounded queue of requests waiting for it."""

    def __init__(self, name: str, path: Path, llm, max_queue: int):
        self.name, self.path, self.llm, self.max_queue = name, path, llm, max_queue
        self.lock = asyncio.Lock()
        self.waiting = 0
        self._format = _chat_formatter(llm)
        self.specials = specials.from_llama(llm)
        # Bytes of the longest token: text of n bytes is at least n / longest tokens, whatever it holds.
        self.longest = max(len(llm.detokenize([i], special=True)) for i in range(llm.n_vocab()))

    @contextlib.asynccontextmanager
    async def turn(self, deadline: float):
        """Hold the model for the block. 503 when --max-queue requests already wait for it, or when its turn has not
        come by the request's deadline."""
        if self.lock.locked() and self.waiting >= self.max_queue:
            raise ApiError(
                503,
                f"model {self.name!r} is busy: {self.waiting} requests are already waiting for it (--max-queue "
                f"{self.max_queue}). Retry in a few seconds.",
                "server_busy",
            )
        self.waiting += 1
        held = False
        try:
            # anyio, not asyncio.wait_for: on Python 3.11 wait_for can time out after the lock was taken, leaking it.
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                await self.lock.acquire()
                held = True
        finally:
            self.waiting -= 1
        if not held:
            raise ApiError(
                503,
                f"model {self.name!r} stayed busy for the whole --request-timeout; retry in a few seconds.",
                "server_busy",
            )
        try:
            yield
        finally:
            self.lock.release()

    def prompt_tokens(self, messages: list[dict]) -> int:
        """Tokens llama.cpp evaluates for these messages: the GGUF's chat template rendered, as
        create_chat_completion renders it; without a template, the text plus a few tokens per message
        (engines.message_tokens, as the llama.cpp engine counts). Messages over N_CTX tokens are counted only until
        that is certain: then a lower bound of at least N_CTX."""
        rough = 0
        for message in messages:
            rough += self.count_upto(message["content"], N_CTX - rough)
            if rough >= N_CTX:
                return rough
        if self._format is not None:
            text = self._format(messages=messages).prompt
            return len(self.llm.tokenize(text.encode(), add_bos=False, special=True))
        return engines.message_tokens(self.llm, messages)

    def count_upto(self, text: str, limit: int) -> int:
        """The tokens of `text` (specials parsed, as in a rendered prompt), exactly while they are at most `limit`;
        beyond it a count over `limit` of a prefix. Prefixes of about 4 characters a token, doubled while they fit,
        each ending before a space (a word is then tokenized as in the whole text): the work stays about that of
        tokenizing `limit` tokens, however long the text."""
        size = 4 * limit + 64
        while size < len(text):
            cut = text.rfind(" ", size // 2, size)
            n = len(self.llm.tokenize(text[: cut if cut > 0 else size].encode(), add_bos=False, special=True))
            if n > limit:
                return n
            size *= 2
        return len(self.llm.tokenize(text.encode(), add_bos=False, special=True))

    def count(self, text: str) -> int:
        # The answer re-tokenized: chunks are not tokens (llama.cpp holds back partial UTF-8 and stop-string prefixes).
        return len(self.llm.tokenize(text.encode(), add_bos=False)) if text else 0


def _chat_formatter(llm):
    """The GGUF's chat template as llama-cpp-python renders it for create_chat_completion (None without one)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = (getattr(llm, "metadata", None) or {}).get("tokenizer.chat_template")
    if not template:
        return None

    def text(token: int) -> str:
        return llm.detokenize([token], special=True).decode(errors="replace") if token != -1 else ""

    return Jinja2ChatFormatter(template, eos_token=text(llm.token_eos()), bos_token=text(llm.token_bos()))


def load_model(name: str, path: Path, threads: int, max_queue: int) -> Model:
    try:
        llm = llamacpp.load(path, n_ctx=N_CTX, threads=threads)
    except ValueError as e:  # llama.cpp could not read the file (damaged, or an architecture it does not know)
        raise UserError(f"llama.cpp cannot load {path} as model {name!r} ({e}); re-export it or pass another file.")
    return Model(name, path, llm, max_queue)


def files(run: Run | None, gguf: str | None, base_gguf: str | None) -> tuple[dict[str, Path], str | None]:
    """The GGUF of each model served (engines.gguf_files: the llama.cpp engine's choice), and why "base" is not
    served when it is not."""
    paths = engines.gguf_files(run, gguf, base_gguf)
    if "base" in paths:
        return paths, None
    whose = f"the run's base model {run.config.get('base_model')}" if run else "the base model (no run given)"
    return paths, f"base is not served: there is no GGUF of {whose}; pass --base-gguf FILE to compare with it"


class Rag:
    """What model "tuned+rag" adds to the tuned model: a catalogue index, and the prompt set (rag.txt, rag_entry.txt)
    that puts its top k entries around the question."""

    def __init__(self, index: retrieval.Index, k: int, prompt_set: prompts.PromptSet):
        self.index, self.k, self.prompts = index, k, prompt_set
        # One sqlite connection, and searches run in the request thread pool: one at a time (a search takes
        # milliseconds, an answer seconds).
        self.lock = threading.Lock()

    def ground(self, chat: Chat) -> list[str]:
        """Replace the last user message (the question) with its RAG prompt, as infer.py ask --rag asks it; the titles of
        the entries retrieved, best first. Other messages stay as sent."""
        last = max((i for i, m in enumerate(chat.messages) if m["role"] == "user"), default=None)
        if last is None:
            raise ApiError(
                400, f"model {RAG!r} searches the catalogue for the last user message; send one.", param="messages"
            )
        question = chat.messages[last]["content"]
        with self.lock:
            hits = self.index.search(question, self.k)
        filled = {"role": "user", "content": prompts.rag_question(self.prompts, question, hits)}
        chat.messages = [*chat.messages[:last], filled, *chat.messages[last + 1 :]]
        return [hit["title"] for hit in hits]


def open_rag(
    run: Run | None, rag_index: str | None, k: int, prompt_set: prompts.PromptSet
) -> tuple[Rag | None, str | None]:
    """Model "tuned+rag", its index opened once (built on first use): over `rag_index`, else over the run's training
    products; or why it is not served."""
    if run is None and not rag_index:
        return None, (
            f"{RAG} is not served: the GGUF is outside a run folder, so there are no training products to search; "
            "pass --rag-index FILE to search a catalogue"
        )
    log.info(
        "%s: opening the search index over %s (built once, then reused)",
        RAG,
        rag_index or "the run's training products",
    )
    if run is None:  # the file read as training reads it by default
        settings = {f.name: f.default for f in fields(DataArguments)}
        index = retrieval.for_file(rag_index, settings, cache_dir() / "rag")
    else:
        index = retrieval.open_index(run, rag_index)
    return Rag(index, k, prompt_set), None


@dataclass
class Served:
    """Everything the app serves: the loaded models and what the page needs to ask them as infer.py does."""

    models: dict[str, Model]
    base_missing: str | None
    system: str  # the run's system prompt ("" when its set has none); the page sends it before each question
    examples: list[str]
    max_tokens: int  # default answer length: the run's (engines.Sampling.for_run)
    timeout: float
    run: str | None = None
    rag: Rag | None = None  # model "tuned+rag": the tuned model with catalogue entries in its prompt
    rag_missing: str | None = None  # why "tuned+rag" is not served, when it is not
    executor: ThreadPoolExecutor = field(init=False)
    closing: threading.Event = field(init=False)  # set on Ctrl-C: every answer ends at its next token

    def __post_init__(self):
        # One worker per model is enough: a model's lock lets one of its requests generate at a time.
        self.executor = ThreadPoolExecutor(max_workers=len(self.models), thread_name_prefix="llama")
        self.closing = threading.Event()

    def listed(self) -> list[tuple[str, Model, dict]]:
        """Each model served, as /v1/models and the page list them: its name, the Model that answers it, and what
        more there is to say of it ("tuned+rag": the index it searches, and k)."""
        out = [(name, m, {}) for name, m in self.models.items()]
        if self.rag:
            out.append((RAG, self.models["tuned"], {"index": self.rag.index.source, "k": self.rag.k}))
        return out

    def unavailable(self) -> list[dict]:
        """The models not served, each with why and what to pass to serve it."""
        missing = (("base", self.base_missing), (RAG, self.rag_missing))
        return [{"id": name, "reason": why} for name, why in missing if why]

    def model(self, name) -> Model:
        """The loaded model that answers `name` ("tuned+rag": tuned's)."""
        if name in self.models:
            return self.models[name]
        if name == RAG and self.rag:
            return self.models["tuned"]
        for missing in self.unavailable():
            if name == missing["id"]:
                raise ApiError(404, f"model {name!r}: {missing['reason']}.", param="model", code="model_not_found")
        served = ", ".join(name for name, _, _ in self.listed())
        raise ApiError(
            404, f"model {name!r} is not served here; use one of: {served}.", param="model", code="model_not_found"
        )


def load(
    run: Run | None,
    gguf: str | None,
    base_gguf: str | None,
    threads: int,
    max_queue: int,
    timeout: float,
    rag_index: str | None = None,
    rag_k: int = RAG_K,
) -> Served:
    """Load the tuned model (and the base one when it has a GGUF) once, with the run's prompt set and products, and
    open the index "tuned+rag" searches (`rag_index`, else the run's training products)."""
    paths, base_missing = files(run, gguf, base_gguf)
    loaded = {name: load_model(name, path, threads, max_queue) for name, path in paths.items()}
    ps = run.prompts if run else prompts.load(prompts.DEFAULT_SET)  # a GGUF outside a run: the default prompt set
    rag, rag_missing = open_rag(run, rag_index, rag_k, ps)
    if run:
        max_tokens = engines.Sampling().for_run(run).max_new_tokens
    else:  # the answer length of a run trained with the default --max-content-chars
        max_tokens = sampling.answer_tokens(DataArguments.max_content_chars)
    # The run by its folder's name: the page and its JSON show no path of this machine.
    name = run.dir.name if run else None
    return Served(loaded, base_missing, ps.system, examples(run), max_tokens, timeout, name, rag, rag_missing)


def examples(run: Run | None, n: int = EXAMPLES) -> list[str]:
    """Questions about the run's first train products, each phrased as training asked it (prompts.question)."""
    if run is None:
        return []
    rows = run.split("train")[:n]
    return [prompts.question(run.prompts, row["title"], str(row["id"]), run.seed) for row in rows]
