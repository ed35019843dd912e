"""infer.py --serve: one local server for a run's tuned and base models, an OpenAI-compatible API and a playground.

    GET  /                     the playground (playground.html): a question, Base | Tuned | Tuned + RAG answers
                               streaming side by side
    GET  /playground.json      what the page needs: models, the run's system prompt, example questions, defaults
    GET  /v1/models            the models served: "tuned", "base" when it has a GGUF, "tuned+rag" when there is an index
    POST /v1/chat/completions  OpenAI chat completions; "model": "tuned", "base" or "tuned+rag", with or without
                               "stream": true

"tuned+rag" is the tuned model (the same llama.cpp instance, lock and queue) asked as `infer.py --rag` asks it: the
last user message is searched in a catalogue index (retrieval.py) and replaced by the run's RAG prompt around the top
k entries (rag.txt, rag_entry.txt); the answer names their titles in an extra field, "retrieved".

Why our own small Starlette app and not llama_cpp.server.app.create_app with two model aliases: its LlamaProxy keeps
one model loaded and reloads the file whenever a request names the other one, and every request waits behind one
global lock, so base and tuned could never answer at the same time and each question of the page would reload both
files. Here each model is one llama_cpp.Llama, loaded once, behind its own lock: base and tuned stream at the same
time, and requests for one model queue in arrival order. Llama.create_chat_completion renders the GGUF's chat template
and yields OpenAI-format chunks itself, so this module only adds routes, checks and limits.

Limits (defaults and their reasons in config.py): at most --max-queue requests wait per model, beyond that 503 at
once; every request ends within --request-timeout seconds of arriving (still waiting: 503; generating: cut there,
finish_reason "length"). Bodies over MAX_BODY get 413. The work a request causes before it is queued is bounded:
messages longer than any N_CTX tokens could be are refused by their length, and the rest are tokenized only as far as
it takes to know whether they fit (check_room). A connection has SERVE_HEADER_TIMEOUT seconds to send its request
headers and as long for the body, so idle sockets cannot hold uvicorn's connection limit.
Safety: binds 127.0.0.1 unless told otherwise; any other address needs an API key, and with a key every route but the
page itself needs "Authorization: Bearer <key>". Without a key, requests must name a loopback host (no DNS
rebinding) and POST JSON (a cross-site form or no-cors fetch cannot make the server generate). Every message is
rebuilt from its role and content, and the content made plain text for the model's own special tokens (specials.py)
before the chat template renders it. Every response carries a Content-Security-Policy that lets the page run only its
own inline script and style, and may not be framed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import shlex
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from titletune import generate, llamacpp, models, prompts, retrieval, specials
from titletune.config import RAG_K, SERVE_CONNECTIONS, SERVE_HEADER_TIMEOUT, DataArguments, cache_dir
from titletune.errors import UserError
from titletune.runs import Run

log = logging.getLogger(__name__)

N_CTX = llamacpp.N_CTX
MAX_BODY = 1 << 20  # bytes: a whole 2048-token context is ~10 KB of text; a body near 1 MB is not a question
EXAMPLES = 4  # example questions on the page, from the run's first train products
KEY_ENV = "TITLETUNE_API_KEY"
PAGE = Path(__file__).with_name("playground.html")
RETRY_AFTER = "5"  # seconds, in a 503: about one answer of the embedded model on 2 cores, under load
RAG = "tuned+rag"


class ApiError(Exception):
    """A request the server refuses: answered with `status` and an OpenAI-style JSON error."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,  # OpenAI's names where it has one: model_not_found, context_length_exceeded
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- models


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
        create_chat_completion renders it; without a template, the text plus a few tokens per message. Messages over
        N_CTX tokens are counted only until that is certain: then a lower bound of at least N_CTX."""
        rough = 0
        for message in messages:
            rough += self.count_upto(message["content"], N_CTX - rough)
            if rough >= N_CTX:
                return rough
        if self._format is not None:
            text = self._format(messages=messages).prompt
            return len(self.llm.tokenize(text.encode(), add_bos=False, special=True))
        text = sum(len(self.llm.tokenize(m["content"].encode(), add_bos=False)) for m in messages)
        return text + 8 * len(messages) + 8

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
    """The GGUF of each model served, and why "base" is not served when it is not. Tuned: --gguf, else the run's.
    Base: --base-gguf, else the embedded GGUF when the run's base is the embedded model (as generate.LlamaCppEngine)."""
    paths = {"tuned": generate.check_gguf(gguf) if gguf else run.gguf()}
    if base_gguf:
        paths["base"] = generate.check_gguf(base_gguf)
    elif run is not None and run.is_embedded:
        paths["base"] = models.embedded_gguf()
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
        """Replace the last user message (the question) with its RAG prompt, as infer.py --rag asks it; the titles of
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
    max_tokens: int  # default answer length: the run's (generate.Sampling.for_run)
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
    sampling = generate.Sampling()
    if run:
        max_tokens = sampling.for_run(run).max_new_tokens
    else:
        max_tokens = DataArguments.max_content_chars // 4 + generate.ANSWER_TEMPLATE_TOKENS
    # The run by its folder's name: the page and its JSON show no path of this machine.
    name = run.dir.name if run else None
    return Served(loaded, base_missing, ps.system, examples(run), max_tokens, timeout, name, rag, rag_missing)


def examples(run: Run | None, n: int = EXAMPLES) -> list[str]:
    """Questions about the run's first train products, each phrased as training asked it (prompts.question)."""
    if run is None:
        return []
    rows = run.split("train")[:n]
    return [prompts.question(run.prompts, row["title"], str(row["id"]), run.seed) for row in rows]


# ---------------------------------------------------------------- requests

# Numeric fields of a request: the create_chat_completion argument each sets, a check, and what the check wants.
# Unset fields take infer.py's values (generate.Sampling, min_p 0 as LlamaCppEngine), not OpenAI's temperature 1:
# a request with only messages answers as `infer.py --engine llamacpp` does.
NUMBERS = {
    "temperature": ("temperature", lambda v: v >= 0, ">= 0 (0 = greedy)"),
    "top_p": ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": ("top_k", lambda v: v >= 0 and v == int(v), "a whole number >= 0 (0 = off)"),
    "min_p": ("min_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": ("repeat_penalty", lambda v: v > 0, "> 0 (1.0 = off)"),
    "repeat_penalty": ("repeat_penalty", lambda v: v > 0, "> 0 (1.0 = off)"),
    "presence_penalty": ("presence_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "frequency_penalty": ("frequency_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "seed": ("seed", lambda v: v == int(v), "a whole number"),
    "max_tokens": ("max_tokens", lambda v: v >= 1 and v == int(v), "a whole number >= 1"),
    "max_completion_tokens": ("max_tokens", lambda v: v >= 1 and v == int(v), "a whole number >= 1"),
}
ROLES = ("system", "user", "assistant")


@dataclass
class Chat:
    model: str
    messages: list[dict]
    stream: bool
    options: dict  # keyword arguments of Llama.create_chat_completion


def parse(body: bytes, max_tokens: int) -> Chat:
    """A chat completion request, checked; every problem is an ApiError(400) naming the field."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}).") from None
    except RecursionError:  # a kilobyte of "[" nests deeper than the JSON parser goes
        raise ApiError(400, "the request body is not valid JSON (nested too deeply).") from None
    if not isinstance(request, dict):
        raise ApiError(400, "the request body must be a JSON object with 'model' and 'messages'.")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {'role', 'content'} objects.", param="messages")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ApiError(
                400,
                f"messages[{i}] must be {{'role': one of {', '.join(ROLES)}, 'content': a string}}.",
                param="messages",
            )
    # Role and content only: a chat template renders tool_calls, name or function_call as turns of their own (Llama
    # 3.1's writes an assistant's tool_calls as a <|python_tag|> call), which the caller must not be able to inject.
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    options = {"temperature": generate.Sampling.temperature, "top_p": generate.Sampling.top_p}
    options.update(top_k=generate.Sampling.top_k, min_p=0.0, repeat_penalty=generate.Sampling.repetition_penalty)
    options["max_tokens"] = max_tokens
    for name, (argument, ok, wanted) in NUMBERS.items():
        value = request.get(name)
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not number or not ok(value):
            raise ApiError(400, f"'{name}' must be {wanted}, got {json.dumps(value)}.", param=name)
        options[argument] = int(value) if name in ("top_k", "seed", "max_tokens", "max_completion_tokens") else value
    stop = request.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
            raise ApiError(400, "'stop' must be a string or a list of up to 4 strings.", param="stop")
        options["stop"] = stop
    if request.get("n", 1) != 1:
        raise ApiError(400, "'n' must be 1: one answer per request.", param="n")
    stream = request.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false.", param="stream")
    model = request.get("model", "tuned")  # OpenAI requires it; a plain curl without it asks the tuned model
    return Chat(model if isinstance(model, str) else json.dumps(model), messages, stream, options)


def prepare(model: Model, chat: Chat, rag: Rag | None) -> tuple[int, list[str] | None]:
    """check_room, for "tuned+rag" once the question is searched and replaced by its RAG prompt, so that the prompt
    counted and checked is the one the model reads; the prompt's tokens and the titles retrieved (None without RAG).
    A question too long for any prompt is refused before it is searched."""
    if rag is None:
        return check_room(model, chat), None
    check_length(model, chat.messages)
    retrieved = rag.ground(chat)
    return check_room(model, chat), retrieved


def check_length(model: Model, messages: list[dict]) -> None:
    """ApiError(400) when the messages are longer than any N_CTX tokens of the model could be, by length alone."""
    chars = sum(len(m["content"]) for m in messages)
    if chars > N_CTX * model.longest:
        raise ApiError(
            400,
            f"the messages are {chars:,} characters, more than any {N_CTX} tokens of this model hold; the model reads "
            f"at most {N_CTX} tokens. Shorten them.",
            param="messages",
            code="context_length_exceeded",
        )


def check_room(model: Model, chat: Chat) -> int:
    """Make the messages plain text for the model's special tokens (chat.messages is replaced) and return the prompt's
    tokens; ApiError(400) when the prompt and max_tokens do not fit the context (llama.cpp itself would silently
    shorten max_tokens, or raise), or when a content still reads as a special token. The work is bounded: messages
    longer than N_CTX of the vocabulary's longest tokens are refused by their length alone, longer ones are counted
    only as far as fits (Model.prompt_tokens), and only messages that fit are tokenized whole, to check them."""
    check_length(model, chat.messages)
    chat.messages = [{"role": m["role"], "content": model.specials.plain(m["content"])} for m in chat.messages]
    used = model.prompt_tokens(chat.messages)
    wanted = chat.options["max_tokens"]
    if used >= N_CTX:
        raise ApiError(
            400,
            f"the messages are at least {used} tokens; the model reads at most {N_CTX}. Shorten them.",
            param="messages",
            code="context_length_exceeded",
        )
    if used + wanted > N_CTX:
        raise ApiError(
            400,
            f"max_tokens {wanted} does not fit: the messages take {used} of the model's {N_CTX} tokens of context, "
            f"so ask for at most {N_CTX - used}.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    for message in chat.messages:
        try:
            model.specials.check(message["content"])
        except UserError as e:
            raise ApiError(400, str(e), param="messages") from None
    return used


_END = object()


class Generation:
    """One answer, generated in a worker thread while its request holds the model; chunks cross to the event loop
    through an asyncio queue. close() ends it at its next token (the client left, or the request is over); the
    request's deadline ends it too."""

    def __init__(
        self,
        model: Model,
        messages: list[dict],
        options: dict,
        deadline: float,
        closing: threading.Event,
        name: str | None = None,  # the model asked for, in the answer: "tuned+rag" is answered by tuned's Model
    ):
        self.model, self.messages, self.options, self.deadline = model, messages, options, deadline
        self.name = name or model.name
        self.closing = closing
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stopped = threading.Event()
        self.cut = False  # set by the worker when the deadline ended the answer
        self.done: asyncio.Future | None = None

    def start(self, executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()

        def put(item) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is stopping
                loop.call_soon_threadsafe(self.queue.put_nowait, item)

        self.done = loop.run_in_executor(executor, self._run, put)

    def _run(self, put) -> None:
        try:
            # A fresh cache for every answer: reusing the previous request's prompt prefix evaluates the rest in other
            # batch shapes, whose rounding flips near-ties, so the same greedy question could answer differently.
            self.model.llm.reset()
            chunks = self.model.llm.create_chat_completion(self.messages, stream=True, model=self.name, **self.options)
            # Closed in this thread, which is the only one that touches the model until the lock is released.
            with contextlib.closing(chunks):
                for chunk in chunks:
                    put(chunk)
                    if self.stopped.is_set() or chunk["choices"][0]["finish_reason"]:
                        break
                    if time.monotonic() > self.deadline or self.closing.is_set():
                        self.cut = True
                        break
        except Exception as e:  # noqa: BLE001 - any failure is the request's answer; the model stays usable
            put(e)
        put(_END)

    async def chunks(self):
        while (item := await self.queue.get()) is not _END:
            if isinstance(item, Exception):
                raise item
            yield item

    async def close(self) -> None:
        self.stopped.set()
        if self.done is not None:
            await self.done


def _failure(e: Exception) -> ApiError:
    if isinstance(e, ValueError):  # llama.cpp's own checks of a request (e.g. a prompt over the context)
        return ApiError(400, f"llama.cpp refused the request: {e}")
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", "server_error")


async def answer(generation: Generation, prompt_tokens: int, extra: dict) -> dict:
    """The streamed chunks gathered into one chat.completion object, with `extra`'s fields ("retrieved")."""
    first, parts, finish = None, [], None
    try:
        async for chunk in generation.chunks():
            first = first or chunk
            choice = chunk["choices"][0]
            parts.append(choice["delta"].get("content") or "")
            finish = choice.get("finish_reason") or finish
    except Exception as e:  # noqa: BLE001 - the worker's failure, raised here: an error answer, not a dead server
        raise _failure(e) from None
    text = "".join(parts)
    tokens = generation.model.count(text)
    return {
        "id": first["id"] if first else f"chatcmpl-{uuid.uuid4()}",
        "object": "chat.completion",
        "created": first["created"] if first else int(time.time()),
        "model": generation.name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": "length" if generation.cut else finish,
            }
        ],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens},
        **extra,
    }


async def events(generation: Generation, extra: dict):
    """The chunks as server-sent events, the first with `extra`'s fields ("retrieved"), ending with [DONE]; a failure
    mid-stream is one error event."""
    last = None
    try:
        async for chunk in generation.chunks():
            yield _event(chunk if last else {**chunk, **extra})
            last = chunk
        if generation.cut and last:  # llama.cpp never sent its last chunk: say why the answer ends here
            yield _event({**last, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]})
    except Exception as e:  # noqa: BLE001 - headers are sent: the failure can only be an event
        yield _event(_failure(e).body())
    yield "data: [DONE]\n\n"


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------- the app


def app(served: Served, api_key: str | None = None):
    """The ASGI app: Guard (key, host, body size and time, security headers) -> the routes."""
    page = PAGE.read_text(encoding="utf-8")

    async def index(request):
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def playground(request):
        sampling = generate.Sampling()
        return JSONResponse(
            {
                "run": served.run,
                "models": [{"id": name, "file": m.path.name, **more} for name, m, more in served.listed()],
                "base_missing": served.base_missing,
                "system": served.system,
                "examples": served.examples,
                "defaults": {
                    "temperature": sampling.temperature,
                    "top_p": sampling.top_p,
                    "max_tokens": served.max_tokens,
                    "repetition_penalty": sampling.repetition_penalty,
                },
                "limits": {"context": N_CTX, "request_timeout": served.timeout},
            }
        )

    async def list_models(request):
        data = [
            {"id": name, "object": "model", "created": int(m.path.stat().st_mtime), "owned_by": "titletune"}
            | {"file": m.path.name, **more}
            for name, m, more in served.listed()
        ]
        out = {"object": "list", "data": data}
        if served.unavailable():
            out["unavailable"] = served.unavailable()
        return JSONResponse(out)

    async def chat(request):
        arrived = time.monotonic()
        asked = parse(await request.body(), served.max_tokens)
        model = served.model(asked.model)
        rag = served.rag if asked.model == RAG else None
        try:
            used, retrieved = await run_in_threadpool(prepare, model, asked, rag)
        except ValueError as e:  # the chat template refused the messages (e.g. roles that do not alternate)
            raise ApiError(400, f"the model's chat template refused the messages: {e}", param="messages") from None
        deadline = arrived + served.timeout
        stack = contextlib.AsyncExitStack()
        try:
            await stack.enter_async_context(model.turn(deadline))
            generation = Generation(model, asked.messages, asked.options, deadline, served.closing, asked.model)
            stack.push_async_callback(generation.close)  # first the worker ends, then the lock is released
            generation.start(served.executor)
            extra = {"retrieved": retrieved} if rag else {}
            if asked.stream:
                return Stream(events(generation, extra), on_close=stack.pop_all().aclose)  # the response closes it
            return JSONResponse(await answer(generation, used, extra))
        finally:
            with anyio.CancelScope(shield=True):
                await stack.aclose()

    async def api_error(request, e: ApiError):
        headers = {"Retry-After": RETRY_AFTER} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def http_error(request, e: HTTPException):
        error = ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}")
        return JSONResponse(error.body(), e.status_code)

    async def server_error(request, e: Exception):
        return JSONResponse(ApiError(500, f"{type(e).__name__}: {e}", "server_error").body(), 500)

    routes = [
        Route("/", index),
        Route("/playground.json", playground),
        Route("/v1/models", list_models),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: server_error}
    inner = Starlette(routes=routes, exception_handlers=handlers)
    return Guard(inner, api_key, security_headers(page))


def security_headers(page: str) -> list[tuple[bytes, bytes]]:
    """Headers for every response. The page's own inline script and style are allowed by their SHA-256, nothing else
    inline (no 'unsafe-inline'): text that found its way into the page could run no script. It may not be framed
    (clickjacking), its type is not sniffed, and no Referer leaves it."""

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}(?:\s[^>]*)?>(.*?)</{tag}>", page, re.DOTALL)
        digests = (base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() for body in bodies)
        return " ".join(f"'sha256-{digest}'" for digest in digests) or "'none'"

    policy = (
        f"default-src 'self'; script-src {hashes('script')}; style-src {hashes('style')}; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    return [
        (b"content-security-policy", policy.encode()),
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]


class Stream(StreamingResponse):
    """Server-sent events that run `on_close` however the response ends: finished, the client gone mid-stream
    (Starlette then cancels the body), or cancelled before its first chunk."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # the worker must stop before the model's lock is released
                await self.on_close()


class Guard:
    """ASGI middleware in front of everything: the API key, the Host header, the body's size and time, and the
    security headers on every response."""

    def __init__(self, app, api_key: str | None, extra_headers: list[tuple[bytes, bytes]] = ()):
        self.app = app
        self.key = f"Bearer {api_key}".encode() if api_key else None
        self.extra = list(extra_headers)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        reply = send

        async def send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.extra]}
            await reply(message)

        headers = dict(scope["headers"])
        if self.key is None and not is_loopback(_hostname(headers.get(b"host", b"").decode("latin-1"))):
            # Without a key the server is bound to loopback; a page whose name resolves to 127.0.0.1 (DNS rebinding)
            # still sends its own name.
            return await _reply(send, 403, "this server answers only requests to localhost / 127.0.0.1.")
        if self.key is not None and scope["path"] != "/" and not _same(headers.get(b"authorization", b""), self.key):
            return await _reply(
                send,
                401,
                "this server needs its API key: send the header 'Authorization: Bearer <key>' (the key it was started "
                f"with: --api-key or ${KEY_ENV}). In the playground, open the page as http://<host>:<port>/#key=<key>.",
                "authentication_error",
                {"WWW-Authenticate": "Bearer"},
            )
        if scope["method"] == "POST":
            if headers.get(b"content-type", b"").split(b";")[0].strip().lower() != b"application/json":
                return await _reply(
                    send, 415, "send the body as JSON, with the header 'Content-Type: application/json'."
                )
            chunks, size, more = [], 0, True
            with anyio.move_on_after(SERVE_HEADER_TIMEOUT) as reading:  # a body sent byte by byte holds no socket
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > MAX_BODY:
                        return await _reply(
                            send, 413, f"the request body is over {MAX_BODY:,} bytes; a question is far less."
                        )
                    more = message.get("more_body", False)
            if reading.cancelled_caught:
                return await _reply(send, 408, f"the request body took over {SERVE_HEADER_TIMEOUT:.0f} s to arrive.")
            receive = _replay(b"".join(chunks), receive)
        await self.app(scope, receive, send)


def _same(given: bytes, expected: bytes) -> bool:
    return hmac.compare_digest(given, expected)  # in constant time: the key cannot be guessed byte by byte


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()  # the client's disconnect, later
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _reply(send, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
    body = json.dumps(ApiError(status, message, kind).body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _hostname(host: str) -> str:
    """The name in a Host header: 'localhost:8000' -> 'localhost', '[::1]:8000' -> '::1'."""
    if host.startswith("["):
        return host[1:].split("]")[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


# ---------------------------------------------------------------- starting


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key(flag: str | None) -> str | None:
    """--api-key, else $TITLETUNE_API_KEY (better: a flag shows in `ps`), else None."""
    return flag or os.environ.get(KEY_ENV) or None


def check(host: str, port: int, key: str | None, max_queue: int, timeout: float) -> list[str]:
    """Every problem with the serve flags, before any model loads."""
    problems = []
    if not 0 < port < 65536:
        problems.append(f"--port must be 1-65535, got {port}")
    if not is_loopback(host) and not key:
        problems.append(
            f"--host {host} lets other machines reach this server, so it needs an API key: set {KEY_ENV}=<key> (or "
            "pass --api-key <key>); clients then send 'Authorization: Bearer <key>'. Or leave --host out to serve "
            "this machine only"
        )
    if max_queue < 0:
        problems.append(f"--max-queue must be >= 0, got {max_queue}")
    if not timeout > 0:
        problems.append(f"--request-timeout must be > 0 seconds, got {timeout}")
    return problems


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening, for uvicorn to serve on; a port in use or a bad address is a
    UserError."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        # Listening now, before the banner is printed, means a client that reads the banner and connects at once is
        # queued by the kernel until uvicorn's loop accepts it (a bound socket that is not listening refuses it).
        sock.listen(2048)
    except OSError as e:
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror or e}). Pass a free --port, or stop what is using it."
        ) from None
    return sock


def run(app, served: Served, sock: socket.socket) -> None:
    """Serve `app` on the bound socket until Ctrl-C or SIGTERM."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # Answers in progress end at their next token (finish_reason "length"), so the connections close and
            # the server stops at once, instead of waiting out the longest answer (or cancelling it mid-token).
            served.closing.set()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        log_level="warning",
        http=_protocol(),
        limit_concurrency=SERVE_CONNECTIONS,  # beyond it uvicorn answers 503 itself; open connections count
        timeout_keep_alive=5,  # seconds an idle kept-alive connection stays open (uvicorn's default, said here)
        h11_max_incomplete_event_size=16 * 1024,  # request line + headers; more gets 400 (h11's default, said here)
        timeout_graceful_shutdown=10,
    )
    Server(config).run(sockets=[sock])


def _protocol():
    """uvicorn's h11 protocol with a time limit on the request headers. uvicorn has none: a connection that sends
    nothing, or a header a byte at a time, stays open for good, and every one counts toward limit_concurrency, so 128
    idle sockets used to lock out every client. Here a connection is closed when its request headers are not complete
    SERVE_HEADER_TIMEOUT seconds after it opened or after its previous answer."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in: a request is under way
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # a kept-alive connection: the next request's headers get the same time

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self.header_timer = self.loop.call_later(SERVE_HEADER_TIMEOUT, self._expire)

        def _disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _expire(self) -> None:
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def banner(served: Served, url: str, key: str | None) -> str:
    """The startup lines: what is served where, then a curl command that asks the tuned model as infer.py does."""
    what = ", ".join(f"{name}={m.path}" for name, m in served.models.items())
    if served.rag:
        what += f", {RAG}=tuned searching {served.rag.index.source} (top {served.rag.k})"
    line = f"serving {what} at {url} (playground: {url}/, OpenAI-compatible API: {url}/v1; Ctrl-C stops)"
    for missing in served.unavailable():
        line += f"; {missing['reason']}"
    question = served.examples[0] if served.examples else "What is 'Girls Ballet Tutu Neon Pink'?"
    body = {"model": "tuned", "messages": prompts.chat(served.system, question), "max_tokens": served.max_tokens}
    auth = f' -H "Authorization: Bearer ${KEY_ENV}"' if key else ""
    curl = f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth}"
    return f"{line}\n  {curl} -d {shlex.quote(json.dumps(body))}"
