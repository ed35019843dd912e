"""Prompt sets: plain-text files with str.format slots, copied into every run and read back at inference.

The chat template (special tokens) belongs to the tokenizer; nothing here writes a special token, and no text from
the catalogue or a user can become one (defang).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from titletune.errors import UserError

FILES = ("system.txt", "user.txt", "assistant.txt")
# Question phrasings that training never uses: the evaluation asks seen products with them too, so that recall is not
# tied to the trained templates. Optional; a set without it uses the default set's.
HELD_OUT = "heldout.txt"
# RAG: the user message around the retrieved entries, and one entry. A set without them (a run trained before RAG, or
# a set of your own) uses the default set's.
RAG_FILES = ("rag.txt", "rag_entry.txt")
RAG_SLOTS = {"rag.txt": ("{context}", "{question}"), "rag_entry.txt": ("{title}", "{content}")}
DEFAULT_SET = Path(__file__).resolve().parent.parent / "prompts" / "qa"

# Chat-control markers of the common template families, for text rendered before any tokenizer is at hand (data
# preparation): ChatML, Llama 3, Phi and Qwen (<|im_start|>, <|eot_id|>, <|endoftext|>, <|reserved_special_token_0|>),
# DeepSeek's full-width bars (<｜User｜>, <｜begin▁of▁sentence｜>), SentencePiece's <s> </s> <unk> <pad>, Gemma's
# turns and <unusedN>, StarCoder's (SmolLM2's) <file_sep> <filename> <jupyter_code> ..., Qwen's tool and think tags,
# Llama 2's [INST] <<SYS>>, and Mistral v3 / Tekken's [TOOL_CALLS] [AVAILABLE_TOOLS] [SYSTEM_PROMPT] [control_8] ....
# In a title, a description or a question, a tokenizer turns them into control ids: an end of turn mid-answer in
# training, or a spoofed turn at inference. A zero-width space after the first character leaves them readable and
# makes them plain text for every tokenizer. Bracketed words are listed one by one: "[DVD]" in a title is not a marker.
# At inference and in training the model's own tokenizer adds every special token it has (specials.py).
_STARCODER = (  # SmolLM2's vocabulary comes from StarCoder
    "file_sep|filename|reponame|repo_name|gh_stars|issue_start|issue_comment|issue_closed|jupyter_start|jupyter_text"
    "|jupyter_code|jupyter_output|jupyter_script|empty_output|fim_prefix|fim_middle|fim_suffix|fim_pad|commit_before"
    "|commit_msg|commit_after"
)
_MISTRAL = (  # v3 and Tekken control tokens, besides [control_N]
    "INST|TOOL_CALLS|AVAILABLE_TOOLS|TOOL_RESULTS|SYSTEM_PROMPT|TOOL_CONTENT|IMG|IMG_BREAK|IMG_END|PREFIX|MIDDLE"
    "|SUFFIX|THINK|ARGS|CALL_ID"
)
_FAMILIES = (  # (first character, the rest as a regex)
    ("<", r"\|[^|<>\s]{1,40}\|>"),
    ("<", "\uff5c[^\uff5c<>\\s]{1,40}\uff5c>"),
    ("<", r"/?s>|unk>|pad>|mask>|bos>|eos>|unused\d{1,4}>|(?:start|end)_of_(?:turn|image)>"),
    ("<", f"(?:{_STARCODER})>"),
    ("<", r"/?(?:tool_call|tool_response|think)>"),
    ("<", r"</?SYS>>"),
    ("[", f"/?(?:{_MISTRAL})\\]|control_\\d{{1,4}}\\]"),
)
_MARKER = re.compile("|".join(re.escape(first) + f"(?:{rest})" for first, rest in _FAMILIES))
ZWSP = "\u200b"
# A marker defang made plain, for counting the products that had one (prepare's notes.chat_markers).
DEFANGED = re.compile("|".join(re.escape(first) + ZWSP + f"(?:{rest})" for first, rest in _FAMILIES))


@dataclass(frozen=True)
class PromptSet:
    system: str
    questions: tuple[str, ...]  # each holds {title}
    answer: str  # holds {content}
    folder: Path
    rag: str = "{context}\n\n{question}"  # holds {context} and {question}
    rag_entry: str = "{title}: {content}"  # holds {title} and {content}
    held_out: tuple[str, ...] = ()  # each holds {title}; never asked in training


def load(folder: str | Path) -> PromptSet:
    """Read system.txt, user.txt (one question phrasing per line) and assistant.txt, and check their slots."""
    folder = Path(folder)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(f"prompt set {folder} lacks {', '.join(missing)}; see prompts/README.md for the three files.")
    system = (folder / "system.txt").read_text(encoding="utf-8").strip()
    questions = tuple(q.strip() for q in (folder / "user.txt").read_text(encoding="utf-8").splitlines() if q.strip())
    answer = (folder / "assistant.txt").read_text(encoding="utf-8").strip()
    _check_questions(folder / "user.txt", questions)
    held_path = folder / HELD_OUT if (folder / HELD_OUT).is_file() else DEFAULT_SET / HELD_OUT
    held_out = _lines(held_path) if held_path.is_file() else ()
    if held_out:
        _check_questions(held_path, held_out)
    trained = set(questions)
    held_out = tuple(q for q in held_out if q not in trained)  # a phrasing training uses is not held out
    if "{content}" not in answer:
        raise UserError(f"{folder / 'assistant.txt'} must contain {{content}}.")
    rag = {}
    for name in RAG_FILES:
        path = folder / name if (folder / name).is_file() else DEFAULT_SET / name
        text = path.read_text(encoding="utf-8").strip()
        missing = [slot for slot in RAG_SLOTS[name] if slot not in text]
        if missing:
            raise UserError(f"{path} must contain {' and '.join(missing)}; see prompts/README.md.")
        rag[name] = text
    return PromptSet(system, questions, answer, folder, rag["rag.txt"], rag["rag_entry.txt"], held_out)


def _lines(path: Path) -> tuple[str, ...]:
    return tuple(q.strip() for q in path.read_text(encoding="utf-8").splitlines() if q.strip())


def _check_questions(path: Path, questions: tuple[str, ...]) -> None:
    bad = [q for q in questions if "{title}" not in q]
    if not questions or bad:
        raise UserError(f"{path}: every line must contain {{title}}; these do not: {bad or ['(empty file)']}")


def _slot(key: str, seed: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def pick_question(prompts: PromptSet, key: str, seed: int, turn: int = 0) -> str:
    """The phrasing a product is asked in training pass `turn`: a start picked by a hash of the product and the seed
    (blake2b, stable across runs and machines, unlike Python's salted hash), then the next line of user.txt each pass,
    so that K passes ask a product K different ways (while K <= the number of phrasings)."""
    return prompts.questions[(_slot(key, seed) + turn) % len(prompts.questions)]


def held_out_question(prompts: PromptSet, title: str, key: str, seed: int) -> str | None:
    """A phrasing training never asked (heldout.txt), for the evaluation; None when the set has none."""
    if not prompts.held_out:
        return None
    return prompts.held_out[_slot(key, seed) % len(prompts.held_out)].replace("{title}", title)


def defang(text: str) -> str:
    """Text with every chat-control marker made plain text (see _MARKER); other text is returned as it is."""
    if "<" not in text and "[" not in text:  # most titles and descriptions: no regex
        return text
    return _MARKER.sub(lambda m: m.group(0)[0] + ZWSP + m.group(0)[1:], text)


def messages(system: str, question: str) -> list[dict]:
    """The prompt side of a conversation: the system message (when there is one: a prompt set's `system`) and the
    user's question, made plain text (defang)."""
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": defang(question)}]


def question(prompts: PromptSet, title: str, key: str, seed: int, turn: int = 0) -> str:
    """The question asked about one product in training pass `turn` (the evaluation asks pass 0's)."""
    return pick_question(prompts, key, seed, turn).replace("{title}", title)


def render(prompts: PromptSet, title: str, content: str, key: str, seed: int, turn: int = 0) -> dict:
    """One product -> a conversational prompt/completion row; TRL puts the loss on the completion only."""
    # str.replace, not str.format: titles and descriptions contain braces.
    return {
        "prompt": messages(prompts.system, question(prompts, title, key, seed, turn)),
        "completion": [{"role": "assistant", "content": prompts.answer.replace("{content}", defang(content))}],
    }


def rag_messages(prompts: PromptSet, question: str, entries: list[dict]) -> list[dict]:
    """The prompt of a grounded answer: the retrieved catalogue entries ({"title", "content"}) and the question, through
    rag.txt and rag_entry.txt, every slot filled once (a title holding "{question}" stays text)."""
    return messages(prompts.system, rag_question(prompts, question, entries))


def rag_question(prompts: PromptSet, question: str, entries: list[dict]) -> str:
    """The user message of a grounded answer (rag.txt): the entries through rag_entry.txt, then the question."""
    context = "\n\n".join(_fill(prompts.rag_entry, title=e["title"], content=e["content"]) for e in entries)
    return _fill(prompts.rag, context=context or "(no entry found)", question=question)


def _fill(template: str, **slots: str) -> str:
    return re.sub(r"\{(" + "|".join(slots) + r")\}", lambda m: slots[m.group(1)], template)


def save(prompts: PromptSet, run_dir: str | Path) -> Path:
    """Copy the set into <run_dir>/prompts, so the run carries the exact prompts it was trained with (and the RAG
    files it will be asked with)."""
    target = Path(run_dir) / "prompts"
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(prompts.folder / name, target / name)
    if prompts.held_out:
        (target / HELD_OUT).write_text("\n".join(prompts.held_out) + "\n", encoding="utf-8")
    (target / "rag.txt").write_text(prompts.rag + "\n", encoding="utf-8")
    (target / "rag_entry.txt").write_text(prompts.rag_entry + "\n", encoding="utf-8")
    return target
