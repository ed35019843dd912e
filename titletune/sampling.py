"""What both inference engines share, below them both: the two models an engine loads (`MODELS`), the generation
knobs (`Sampling`, also infer.py's "generation" flags and the server's defaults) and the default answer length
(`answer_tokens`). The engines are engines.py (llama.cpp, and load_engine) and hf_engine.py (transformers)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from titletune.errors import Problems
from titletune.runs import Run

MODELS = ("base", "tuned")  # the two models an engine loads (evaluate.SYSTEMS: the six systems scored)
ANSWER_TEMPLATE_TOKENS = 28  # tokens an answer may need beyond its description (assistant.txt, end of turn)


@dataclass
class Sampling:
    """Generation knobs, shared by both engines (and infer.py's "generation" flags). temperature 0 is greedy."""

    _argument_group_name = "generation"

    max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Longest answer in tokens (default: the run's answer length, --max-content-chars / 4 + 28 "
            "tokens: 128 for the CPU default, 528 for the GPU presets)."
        },
    )
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy and repeatable."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling when --temperature > 0 (1.0 = off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling when --temperature > 0 (0 = off)."})
    repetition_penalty: float = field(
        default=1.0,
        # llama.cpp's server defaults to 1.1; 1.0 keeps the two engines' answers the same.
        metadata={"help": "Above 1.0 discourages repeats (1.0 = off, in both engines)."},
    )
    num_beams: int = field(default=1, metadata={"help": "Beam search width, transformers engine only."})

    def for_run(self, run: Run) -> Sampling:
        """These settings with max_new_tokens filled in from the run: answer_tokens of its --max-content-chars."""
        if self.max_new_tokens is not None:
            return self
        chars = int(run.data_settings["max_content_chars"])
        return dataclasses.replace(self, max_new_tokens=answer_tokens(chars))

    def llama_cpp(self) -> dict:
        """These settings as keyword arguments of llama_cpp.Llama.create_chat_completion, the same for the llama.cpp
        engine and the server. Fill in max_new_tokens first (for_run): None answers up to the end of the context."""
        return {
            "max_tokens": self.max_new_tokens,
            "temperature": self.temperature,  # 0 = greedy in llama.cpp
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": 0.0,  # llama.cpp defaults to 0.05; transformers has none
            "repeat_penalty": self.repetition_penalty,
        }

    def check(self, problems: Problems | None = None) -> None:
        """Every problem with these settings (raised at once, or added to `problems`)."""
        found = Problems() if problems is None else problems
        found.at_least("--max-new-tokens", self.max_new_tokens, 1)
        found.at_least("--temperature", self.temperature, 0, "0 = greedy")
        if not 0 < self.top_p <= 1:
            found.add(f"--top-p must be in (0, 1], got {self.top_p}")
        found.at_least("--top-k", self.top_k, 0, "0 = off")
        if self.repetition_penalty <= 0:
            found.add(f"--repetition-penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        found.at_least("--num-beams", self.num_beams, 1)
        if problems is None:
            found.done()


def answer_tokens(max_content_chars: int) -> int:
    """The default answer length for products cut at `max_content_chars`: about 4 characters a token in the
    catalogue's English, for the longest answer training kept, plus room for the answer template around it."""
    return max_content_chars // 4 + ANSWER_TEMPLATE_TOKENS
