"""The server's routes and its start: `create_app` (the Starlette app behind asgi.Guard), then what infer.py serve
calls around it: `api_key` and `check` (the flags), `listen` (the socket), `banner` (the startup lines) and `run`.

    GET  /                     the playground (playground.html): a question, Base | Tuned | Tuned + RAG answers
                               streaming side by side
    GET  /playground.json      what the page needs: models, the run's system prompt, example questions, defaults
    GET  /v1/models            the models served: "tuned", "base" when it has a GGUF, "tuned+rag" when there is an index
    POST /v1/chat/completions  OpenAI chat completions; "model": "tuned", "base" or "tuned+rag", with or without
                               "stream": true; "tuned+rag" answers name the entries retrieved in an extra field,
                               "retrieved"

Why our own small Starlette app and not llama_cpp.server.app.create_app with two model aliases: its LlamaProxy keeps
one model loaded and reloads the file whenever a request names the other one, and every request waits behind one
global lock, so base and tuned could never answer at the same time and each question of the page would reload both
files. Here each model is one llama_cpp.Llama, loaded once, behind its own lock: base and tuned stream at the same
time, and requests for one model queue in arrival order. Llama.create_chat_completion renders the GGUF's chat template
and yields OpenAI-format chunks itself, so the package only adds routes, checks and limits.

Start-up: binds 127.0.0.1 unless told otherwise; any other address needs an API key. A connection has
SERVE_HEADER_TIMEOUT seconds to send its request headers (and as long for the body: asgi.Guard), so idle sockets
cannot hold uvicorn's connection limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import socket
import time
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from titletune import engines, prompts
from titletune.config import SERVE_CONNECTIONS, SERVE_HEADER_TIMEOUT
from titletune.errors import UserError
from titletune.llamacpp import N_CTX
from titletune.serve.asgi import KEY_ENV, Guard, Stream, is_loopback, security_headers
from titletune.serve.generation import Generation, answer, events, prepare
from titletune.serve.models import RAG, Served
from titletune.serve.protocol import ApiError, parse

PAGE = Path(__file__).with_name("playground.html")
RETRY_AFTER = "5"  # seconds, in a 503: about one answer of the embedded model on 2 cores, under load


# ---------------------------------------------------------------- the app


def create_app(served: Served, api_key: str | None = None):
    """The ASGI app: Guard (key, host, body size and time, security headers) -> the routes, which find `served` and
    the page in the Starlette app's state."""
    page = PAGE.read_text(encoding="utf-8")
    routes = [
        Route("/", index),
        Route("/playground.json", playground),
        Route("/v1/models", list_models),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: server_error}
    inner = Starlette(routes=routes, exception_handlers=handlers)
    inner.state.served, inner.state.page = served, page
    return Guard(inner, api_key, security_headers(page))


async def index(request):
    return HTMLResponse(request.app.state.page, headers={"Cache-Control": "no-store"})


async def playground(request):
    served: Served = request.app.state.served
    sampling = engines.Sampling()
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
    served: Served = request.app.state.served
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
    served: Served = request.app.state.served
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


# ---------------------------------------------------------------- starting


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
        sock.listen(2048)  # the backlog of connections not yet accepted (uvicorn's own default)
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
    body = {"model": "tuned", "messages": prompts.messages(served.system, question), "max_tokens": served.max_tokens}
    auth = f' -H "Authorization: Bearer ${KEY_ENV}"' if key else ""
    curl = f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth}"
    return f"{line}\n  {curl} -d {shlex.quote(json.dumps(body))}"
