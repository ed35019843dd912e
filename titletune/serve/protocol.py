"""The OpenAI chat completions request, as the server reads it: `parse` checks a body into a `Chat`, and `ApiError` is
every refusal, answered with its status and an OpenAI-style JSON error.

Every message is rebuilt from its role and content here; unset sampling fields take infer.py's values
(engines.Sampling), not OpenAI's, so a request with only messages answers as `infer.py --engine llamacpp` does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from titletune import engines


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


# Numeric fields of a request: the create_chat_completion argument each sets, a check, and what the check wants.
# Unset fields take infer.py's values (engines.Sampling.llama_cpp, as LlamaCppEngine), not OpenAI's temperature 1:
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
WHOLE = ("top_k", "seed", "max_tokens", "max_completion_tokens")  # passed on as int: 5.0 is 5
ROLES = ("system", "user", "assistant")


@dataclass
class Chat:
    model: str
    messages: list[dict]
    stream: bool
    options: dict  # keyword arguments of Llama.create_chat_completion


def parse(body: bytes, max_tokens: int) -> Chat:
    """A chat completion request, checked; every problem is an ApiError(400) naming the field."""
    request = _json_object(body)
    messages = _messages(request.get("messages"))
    options = engines.Sampling(max_new_tokens=max_tokens).llama_cpp()
    for name, (argument, ok, wanted) in NUMBERS.items():
        value = request.get(name)
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not number or not ok(value):
            raise ApiError(400, f"'{name}' must be {wanted}, got {json.dumps(value)}.", param=name)
        options[argument] = int(value) if name in WHOLE else value
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


def _json_object(body: bytes) -> dict:
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}).") from None
    except RecursionError:  # a kilobyte of "[" nests deeper than the JSON parser goes
        raise ApiError(400, "the request body is not valid JSON (nested too deeply).") from None
    if not isinstance(request, dict):
        raise ApiError(400, "the request body must be a JSON object with 'model' and 'messages'.")
    return request


def _messages(messages) -> list[dict]:
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
    return [{"role": m["role"], "content": m["content"]} for m in messages]
