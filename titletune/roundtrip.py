"""The template round trip, the first part of the export's fidelity check (fidelity.py holds the rest): 16-bit files
only, since quants copy their metadata and vocabulary.

llama.cpp renders each conversation itself, through the chat handler create_chat_completion picks from the GGUF's
metadata (what its server and Ollama do), and the prompt token ids are compared with transformers' rendering through
the tokenizer's chat template; the reference answers are tokenized by both too. The token the model was trained to end
its answers with must be the GGUF's EOS or EOT, and a stop in the Modelfile. Any difference fails the export with its
cause and fix. llama.cpp's side runs in a child process (fidelity.child).
"""

from __future__ import annotations

from pathlib import Path

from titletune.errors import UserError
from titletune.fidelity import Sample, child, prompt_tokens
from titletune.llamacpp_child import first_difference


def round_trip(path: Path, tokenizer, chosen: list[Sample], end: int, stops: list[str]) -> dict:
    """Fail (UserError, naming the cause and the fix) unless llama.cpp renders every conversation, with and without
    the system message, to the token ids transformers does, and ends answers on the trained end token."""
    conversations = _conversations(chosen)
    expected = [prompt_tokens(tokenizer, c) for c in conversations]
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    # The reference answers too: product text (numbers, sizes, punctuation, non-ASCII) is where a pre-tokenizer differs.
    texts += [s.reference for s in chosen]
    expected_texts = expected + [tokenizer(s.reference, add_special_tokens=False)["input_ids"] for s in chosen]
    got = child(path, {"op": "render", "conversations": conversations, "texts": texts})
    name = path.name
    template = got["metadata"].get("tokenizer.chat_template")
    if not template:
        raise UserError(
            f"{name} has no tokenizer.chat_template, so llama.cpp would prompt it in the llama-2 format. Give the "
            "merged model a chat template (chat_template.jinja or tokenizer_config.json) and export again."
        )
    _check_tokenized(name, got, expected_texts, texts)
    _check_rendered(name, tokenizer, got, template, expected, conversations)
    end_text = _check_end(name, tokenizer, got, end, stops)
    return {
        "conversations": len(conversations),
        "texts": len(texts),
        "chat_format": got["chat_format"],
        "end_token": end_text,
        "identical": True,
    }


def _conversations(chosen: list[Sample]) -> list[list[dict]]:
    """Each sample's prompt messages, and again without the system message when it has one."""
    conversations = []
    for sample in chosen:
        conversations.append(sample.messages)
        user_only = [m for m in sample.messages if m["role"] != "system"]
        if user_only != sample.messages:
            conversations.append(user_only)
    return conversations


def _check_tokenized(name: str, got: dict, expected_texts: list[list[int]], texts: list[str]) -> None:
    """Every text tokenized by the GGUF's vocabulary as by the merged model's tokenizer."""
    meta = got["metadata"]
    for ids, want, text in zip(got["tokenized"], expected_texts, texts, strict=True):
        if ids != want:
            at = first_difference(ids, want)
            raise UserError(
                f"{name} tokenizes text differently from the merged model's tokenizer (pre-tokenizer "
                f"tokenizer.ggml.pre={meta.get('tokenizer.ggml.pre')!r}, model "
                f"tokenizer.ggml.model={meta.get('tokenizer.ggml.model')!r}): in {text[:60]!r}... from token {at}, "
                f"llama.cpp {ids[at : at + 5]}, transformers {want[at : at + 5]}. The converter misread tokenizer.json "
                "or does not know this pre-tokenizer: update llama-cpp-python (its converter), or pass "
                "--llama-cpp-dir with a llama.cpp checkout that knows the model."
            )


def _check_rendered(
    name: str, tokenizer, got: dict, template: str, expected: list[list[int]], conversations: list[list[dict]]
) -> None:
    """Every conversation rendered by llama.cpp's chat handler to the ids of the tokenizer's chat template."""
    for ids, want, conv in zip(got["rendered"], expected, conversations, strict=True):
        if ids != want:
            at = first_difference(ids, want)
            cause = (
                f"llama-cpp-python uses its built-in '{got['chat_format']}' format for this template, not the template"
                if got["chat_format"] != "chat_template.default"
                else "the GGUF's tokenizer.chat_template is not the tokenizer's chat template"
                if template != tokenizer.chat_template
                else "llama.cpp's Jinja renders the template differently (or adds a BOS the template does not)"
            )
            raise UserError(
                f"{name} renders the chat differently from the tokenizer's chat template ({cause}): for "
                f"{[m['role'] for m in conv]}, from token {at}, llama.cpp {_show(tokenizer, ids[at : at + 8])}, "
                f"transformers {_show(tokenizer, want[at : at + 8])}. The server, create_chat_completion and Ollama "
                "would prompt it unlike training. Write the tokenizer's chat template into the GGUF (re-export from "
                "merged/ with the tokenizer's chat_template.jinja), and report the template to llama-cpp-python if "
                "it still differs."
            )


def _check_end(name: str, tokenizer, got: dict, end: int, stops: list[str]) -> str:
    """The trained end token is the GGUF's EOS or EOT and one of the Modelfile's stops; its text."""
    meta = got["metadata"]
    ends = {int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta}
    end_text = tokenizer.convert_ids_to_tokens(end)
    if end not in ends:
        raise UserError(
            f"{name} would not stop where the model was trained to: answers end with {end_text!r} (id {end}), but the "
            f"GGUF's EOS/EOT is {sorted(ends)} ({', '.join(repr(got['tokens'].get(str(i))) for i in sorted(ends))}). "
            f"Set the tokenizer's eos_token to {end_text!r} in merged/ (tokenizer_config.json and "
            "generation_config.json) and export again."
        )
    if end_text not in stops:
        raise UserError(
            f"the Modelfile's stops {stops} miss {end_text!r}, the token answers end with, so Ollama would run on "
            f"past each answer. Set the tokenizer's eos_token to {end_text!r}."
        )
    return end_text


def _show(tokenizer, ids: list[int]) -> str:
    return repr(tokenizer.decode(ids)) if ids else "(end)"
