"""A model's special tokens, taken from its own vocabulary, and untrusted text made so that none of them survives.

prompts.defang knows the markers of the common chat-template families, which is all data preparation can know (it
runs before any tokenizer is loaded). A model has more: SmolLM2 17 special tokens (<file_sep>, <jupyter_code>, ...),
Llama 3 256 reserved ones, Gemma hundreds of <unusedN>, Qwen its tool tags as added tokens. Wherever text meets the
model's tokenizer (training rows, both inference engines, the server) a `Specials` of that tokenizer makes every
occurrence of any of them plain text, as defang does (a zero-width space after the first character), then checks the
result: the text tokenizes with none of their ids.

    transformers  tokenizer.all_special_tokens and every added token (special or not: an added token is matched in
                  text before anything else, so "<tool_call>" in a title would be the tool-call id)
    llama.cpp     every control, user-defined and unknown token of the GGUF vocabulary (llama_vocab_get_attr): the
                  ones llama-cpp-python parses out of a rendered prompt, which it tokenizes with special=True
"""

from __future__ import annotations

import re
from collections.abc import Callable

from titletune import prompts
from titletune.errors import UserError

PASSES = 4  # a marker made plain can leave another one whole only if tokens overlap; more than 2 never happens


class Specials:
    """The texts of a tokenizer's special tokens (id -> text), and `tokenize` (text -> ids, specials parsed)."""

    def __init__(
        self, tokens: dict[int, str], tokenize: Callable[[str], list[int]], unknown: frozenset[int] = frozenset()
    ):
        # One character cannot take a zero-width space inside it, and whitespace is not a marker anyone types to
        # spoof a turn (some vocabularies add runs of spaces); both are left to the tokenizer.
        self.tokens = {i: t for i, t in tokens.items() if len(t) >= 2 and not t.isspace()}
        self._tokenize = tokenize
        # <unk> is also what a SentencePiece model without byte fallback makes of a character it lacks, the
        # zero-width space included: that id from plain text is no control token, so it is not checked for.
        unknown = set(unknown) & set(tokenize(prompts.ZWSP))
        self.ids = frozenset(self.tokens) - unknown
        self._pattern = _alternation(set(self.tokens.values()))

    def plain(self, text: str) -> str:
        """The text with every chat marker of the common families (prompts.defang) and every special token of this
        tokenizer made plain text; other text is returned as it is."""
        text = prompts.defang(text)
        if self._pattern is None:
            return text
        for _ in range(PASSES):
            made = self._pattern.sub(lambda m: m[0][0] + prompts.ZWSP + m[0][1:], text)
            if made == text:
                break
            text = made
        return text

    def check(self, text: str) -> None:
        """UserError when the text still tokenizes to one of the special ids."""
        found = sorted(self.ids.intersection(self._tokenize(text)))
        if found:
            names = ", ".join(repr(self.tokens[i]) for i in found[:5])
            raise UserError(
                f"the text {_excerpt(text)!r} still reads as the model's special token(s) {names} after they were "
                "made plain text; remove them from the text."
            )

    def messages(self, messages: list[dict], check_all: bool = True) -> list[dict]:
        """Each message rebuilt from its role and content only (tool_calls, name and the like would be rendered by
        some chat templates as turns of their own), the content made plain and checked; with check_all=False only a
        content that plain() changed is checked (training rows: the rest holds no special token's text)."""
        out = []
        for message in messages:
            content = self.plain(message["content"])
            if check_all or content != message["content"]:
                self.check(content)
            out.append({"role": message["role"], "content": content})
        return out

    def search(self, text: str) -> bool:
        """Whether the text holds one of this tokenizer's special tokens as it is."""
        return self._pattern is not None and self._pattern.search(text) is not None


def from_tokenizer(tokenizer) -> Specials:
    """The special and added tokens of a transformers tokenizer."""
    tokens = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    for text in tokenizer.all_special_tokens:
        tokens.setdefault(tokenizer.convert_tokens_to_ids(text), text)

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    unknown = {tokenizer.unk_token_id} if tokenizer.unk_token_id is not None else set()
    return Specials(tokens, tokenize, unknown)


def from_llama(llm) -> Specials:
    """The control, user-defined and unknown tokens of a GGUF's vocabulary, as llama.cpp loaded it (llama_cpp.Llama).
    About 0.1 s for SmolLM2's 49,152 tokens."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    kinds = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    tokens, unknown = {}, set()
    for i in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        attr = llama_cpp.llama_vocab_get_attr(vocab, i)
        if attr & (kinds | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN):
            tokens[i] = llm.detokenize([i], special=True).decode("utf-8", errors="replace")
            if attr & llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN:
                unknown.add(i)

    def tokenize(text: str) -> list[int]:
        # special=True: as llama-cpp-python tokenizes the prompt it renders from the chat template.
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    return Specials(tokens, tokenize, unknown)


def _alternation(words: set[str]) -> re.Pattern | None:
    """One regex for many literal words, as a trie: Llama 3 has 256 special tokens and Gemma thousands, and an
    alternation of that many literals is tried one by one at every position of the text."""
    if not words:
        return None
    trie: dict = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def pattern(node: dict) -> str:
        end = "" in node
        branches = [re.escape(char) + pattern(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if end else body  # greedy: the longest word at a position wins

    return re.compile(pattern(trie))


def _excerpt(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
