"""ASGI pieces in front of and around the routes: `Guard` (the API key, the Host header, the request body's type, size
and time, and the security headers on every response) and `Stream` (server-sent events that always clean up).

Safety: with a key, every route but the page itself needs "Authorization: Bearer <key>". Without a key (the server is
then bound to loopback), requests must name a loopback host (no DNS rebinding) and POST JSON (a cross-site form or
no-cors fetch cannot make the server generate). Bodies over MAX_BODY get 413, and a body has SERVE_HEADER_TIMEOUT
seconds to arrive. Every response carries a Content-Security-Policy that lets the page run only its own inline script
and style, and may not be framed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import re

import anyio
from starlette.responses import StreamingResponse

from titletune.config import SERVE_HEADER_TIMEOUT
from titletune.serve.protocol import ApiError

MAX_BODY = 1 << 20  # bytes: a whole context (llamacpp.N_CTX tokens) is ~10 KB of text; a body near 1 MB is no question
KEY_ENV = "TITLETUNE_API_KEY"


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
            body = await _read_body(receive, send)
            if body is None:  # the client left, or was answered
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)


async def _read_body(receive, send) -> bytes | None:
    """The whole request body; None once the client left, or was answered 413 (over MAX_BODY) or 408 (not all sent
    within SERVE_HEADER_TIMEOUT seconds)."""
    chunks, size, more = [], 0, True
    with anyio.move_on_after(SERVE_HEADER_TIMEOUT) as reading:  # a body sent byte by byte holds no socket
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY:
                await _reply(send, 413, f"the request body is over {MAX_BODY:,} bytes; a question is far less.")
                return None
            more = message.get("more_body", False)
    if reading.cancelled_caught:
        await _reply(send, 408, f"the request body took over {SERVE_HEADER_TIMEOUT:.0f} s to arrive.")
        return None
    return b"".join(chunks)


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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
