"""One chat completion against a loaded model: the checks before it is queued (`prepare`), the worker that generates
it (`Generation`), and its chunks shaped into the OpenAI response: one chat.completion object (`answer`) or
server-sent events (`events`).

The work a request causes before it is queued is bounded: messages longer than any N_CTX tokens could be are refused
by their length, and the rest are tokenized only as far as it takes to know whether they fit (check_room). Every
message content is made plain text for the model's own special tokens (specials.py) before the chat template renders
it. Every request ends within --request-timeout seconds of arriving: an answer still generating then is cut there,
finish_reason "length".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from titletune.errors import UserError
from titletune.llamacpp import N_CTX
from titletune.serve.models import Model, Rag
from titletune.serve.protocol import ApiError, Chat


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
