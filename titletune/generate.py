"""Load a trained run for inference and answer questions with the base model, the tuned model, or both.

Two engines with the same small surface (`generate`, and `loss` where the engine has logits):
- `TransformersEngine`: one base model in memory plus the LoRA adapter; base answers come from the same weights
  with the adapter switched off (`disable_adapter()`), so the model is loaded once. Or the run's merged/ folder.
- `LlamaCppEngine`: GGUF files through llama-cpp-python, which renders the chat template embedded in the GGUF. What
  it shares with the server (titletune/serve/) is here once: which GGUF answers as which model (`gguf_files`), the
  sampling settings as llama.cpp's arguments (`Sampling.llama_cpp`) and the token estimate of messages without a
  rendered template (`message_tokens`); the context both open is llamacpp.N_CTX.
Questions always go through the run's own prompts/ (system prompt included) and the tokenizer's chat template,
exactly as in training. Before any template renders them, every message is rebuilt from its role and content and the
content is made plain text for that model's own special tokens (specials.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from titletune import llamacpp, machine, models, prompts, specials, teacher
from titletune.config import RAG_K
from titletune.errors import Problems, UserError
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


# ---------------------------------------------------------------- transformers


class TransformersEngine:
    """transformers + peft. One base model; the adapter is toggled off for base answers."""

    name = "transformers"
    supports_loss = True

    def __init__(
        self,
        run: Run,
        systems: tuple[str, ...] = MODELS,
        use_merged: bool = False,
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.run = run
        self.systems = tuple(systems)
        self.max_length = run.max_length
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        trust = run.trust_remote_code(trust_remote_code)  # infer.py's --trust-remote-code; never the run folder's
        base_name = run.base_model
        adapter_dir, merged_dir = run.adapter, run.merged

        name = dtype if dtype != "auto" else run.section("model").get("dtype") or "auto"  # else what training used
        try:
            dtype = machine.torch_dtype(name)
        except UserError:
            raise UserError(f"{run.dir / 'run_config.yaml'}: model.dtype {name!r} is not a torch dtype.") from None
        if dtype is None:  # auto: as saved, or on CPU as trained (bf16 autocast over a bf16 base)
            trained_bf16 = bool(run.section("training").get("bf16"))
            cpu_bf16 = self.device == "cpu" and trained_bf16 and machine.bf16_supported()
            # Measured on CPU (bench/README.md): 1.3x fp32's tok/s under PASSIVE, 1.8x with spinning threads.
            dtype = torch.bfloat16 if cpu_bf16 else "auto"

        def load_model(name: str):
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    name, dtype=dtype, trust_remote_code=trust, use_safetensors=True
                )
            except OSError as e:
                raise models.hub_error(name, e) from None
            return model.to(self.device).eval()

        tokenizer_dir = base_name
        self.base = self.tuned = None
        self._adapter = False
        if "tuned" in self.systems and use_merged:
            if not (merged_dir / "config.json").is_file():
                raise UserError(f"{merged_dir} is missing; leave out --use-merged to apply adapter/ to the base.")
            self.tuned = load_model(str(merged_dir))
            tokenizer_dir = str(merged_dir)
            if "base" in self.systems:
                self.base = load_model(base_name)
        elif "tuned" in self.systems:
            from peft import PeftModel

            if not (adapter_dir / "adapter_config.json").is_file():
                raise UserError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json); did training finish?")
            self.tuned = PeftModel.from_pretrained(load_model(base_name), str(adapter_dir)).eval()
            self.base = self.tuned  # same weights; generate() switches the adapter off for "base"
            self._adapter = True
            if (adapter_dir / "tokenizer_config.json").is_file():
                tokenizer_dir = str(adapter_dir)
        else:
            self.base = load_model(base_name)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust)
        self.specials = specials.from_tokenizer(self.tokenizer)
        model = self.tuned if self.tuned is not None else self.base
        # Stop at every end token the model or tokenizer names: an instruct model's end-of-turn token
        # (<|im_end|>, <|eot_id|>) is often only in generation_config, and without it generation never stops.
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        if not eos:
            raise UserError(f"{tokenizer_dir}: neither the tokenizer nor generation_config names an end token.")
        self.eos_ids = eos
        if self.tokenizer.pad_token_id is None:
            pad = model.generation_config.pad_token_id
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(pad if pad is not None else eos[0])
        self.tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions:  # the run's max_length bounded training only; a RAG prompt may be longer
            self.tokenizer.model_max_length = int(positions)

    @property
    def context(self) -> int:
        """Tokens the model reads at most: its position limit (the run's max_length only bounded training)."""
        config = (self.tuned if self.tuned is not None else self.base).config
        return int(getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length)

    def prompt_tokens(self, conversation: list[dict]) -> int:
        return len(self._ids(conversation, add_generation_prompt=True))

    def _model(self, system: str):
        if system not in self.systems:
            raise ValueError(f"engine was loaded without {system!r} (systems={self.systems})")
        return self.tuned if system == "tuned" else self.base

    def _render(self, conversations: list[list[dict]]):
        return self.tokenizer.apply_chat_template(
            [self.specials.messages(conversation) for conversation in conversations],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            padding=True,
            return_tensors="pt",
        ).to(self.device)

    def generate(
        self,
        conversations: list[list[dict]],
        system: str = "tuned",
        sampling: Sampling | None = None,
        batch_size: int = 8,
        progress: bool = False,
    ) -> list[str]:
        """One answer per conversation. Batched with left padding; batches hold similar lengths."""
        import contextlib

        import torch
        from transformers import GenerationConfig

        sampling = (sampling or Sampling()).for_run(self.run)
        sampling.check()
        model = self._model(system)
        sample = sampling.temperature > 0
        gen_config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sample,
            temperature=sampling.temperature if sample else None,
            top_p=sampling.top_p if sample else None,
            top_k=sampling.top_k if sample else None,
            repetition_penalty=sampling.repetition_penalty,
            num_beams=sampling.num_beams,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        order = sorted(range(len(conversations)), key=lambda i: len(str(conversations[i])))
        answers: list[str] = [""] * len(conversations)
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        bar = _tqdm(total=len(conversations), desc=f"{system} answers", disable=not progress)
        off = model.disable_adapter() if (system == "base" and self._adapter) else contextlib.nullcontext()
        with off, torch.inference_mode():
            for batch in batches:
                enc = self._render([conversations[i] for i in batch])
                out = model.generate(**enc, generation_config=gen_config)
                new = out[:, enc["input_ids"].shape[1] :]
                for i, ids in zip(batch, new):
                    text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                    answers[i] = text.strip()
                bar.update(len(batch))
        bar.close()
        return answers

    def loss(self, rows: list[dict], system: str = "tuned", batch_size: int = 8) -> tuple[float, int]:
        """Teacher-forced NLL on the completion tokens only (the prompt is context, as in training).

        rows: {"prompt": [msgs], "completion": [msgs]}. Returns (summed NLL, number of completion tokens).
        """
        import contextlib

        import torch

        model = self._model(system)
        examples = []
        for row in rows:
            prompt_ids = self._ids(row["prompt"], add_generation_prompt=True)
            full_ids = self._ids(row["prompt"] + row["completion"], add_generation_prompt=False)
            if full_ids[: len(prompt_ids)] != prompt_ids:
                raise UserError(
                    "the chat template renders the prompt differently with the answer appended; "
                    "cannot separate completion tokens for the loss."
                )
            full_ids = full_ids[: self.max_length]  # as training truncated
            if len(full_ids) > len(prompt_ids):
                examples.append((full_ids, len(prompt_ids)))
        total, count = 0.0, 0
        off = model.disable_adapter() if (system == "base" and self._adapter) else contextlib.nullcontext()
        with off, torch.inference_mode():
            scored = teacher.answer_logprobs(model, examples, self.tokenizer.pad_token_id, batch_size)
            for logprobs, (ids, n_prompt) in zip(scored, examples, strict=True):
                total += float(teacher.answer_nll(logprobs, ids[n_prompt:]).sum())
                count += len(ids) - n_prompt
        return total, count

    def _ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        enc = self.tokenizer.apply_chat_template(
            self.specials.messages(messages),
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=True,
        )
        return list(enc["input_ids"])


# ---------------------------------------------------------------- llama.cpp


class LlamaCppEngine:
    """GGUF files through llama-cpp-python; the chat template is the one embedded in each GGUF."""

    name = "llamacpp"
    supports_loss = False

    def __init__(
        self,
        run: Run,
        systems: tuple[str, ...] = MODELS,
        gguf: str | Path | None = None,
        base_gguf: str | Path | None = None,
        threads: int | None = None,
        n_ctx: int = llamacpp.N_CTX,
    ):
        self.run = run
        self.systems = tuple(systems)
        self.threads = threads or machine.llama_threads()
        self.n_ctx = n_ctx
        self.paths = gguf_files(run, gguf, base_gguf, self.systems)
        if "base" in self.systems and "base" not in self.paths:
            raise UserError(
                f"base answers with --engine llamacpp need a GGUF of the base model {run.config['base_model']}; "
                "pass --base-gguf FILE, or --only tuned, or --engine transformers."
            )
        self.llms = {system: self._load(path) for system, path in self.paths.items()}
        self.specials = {system: specials.from_llama(llm) for system, llm in self.llms.items()}

    @property
    def context(self) -> int:
        return self.n_ctx

    def prompt_tokens(self, conversation: list[dict]) -> int:
        """The messages' tokens in the GGUF's own vocabulary, plus a few per message for the chat template's
        markers. Text is tokenized as text (special=False), as llama.cpp's chat path does with message content."""
        system, llm = next(iter(self.llms.items()))
        return message_tokens(llm, self.specials[system].messages(conversation))

    def _load(self, path: Path):
        return llamacpp.load(path, n_ctx=self.n_ctx, threads=self.threads)

    def generate(
        self,
        conversations: list[list[dict]],
        system: str = "tuned",
        sampling: Sampling | None = None,
        batch_size: int = 1,
        progress: bool = False,
    ) -> list[str]:
        """One answer per conversation (llama-cpp-python answers one at a time)."""
        sampling = (sampling or Sampling()).for_run(self.run)
        sampling.check()
        if sampling.num_beams != 1:
            raise UserError("--num-beams works only with --engine transformers; llama.cpp has no beam search.")
        if system not in self.llms:
            raise ValueError(f"engine was loaded without {system!r} (systems={self.systems})")
        llm = self.llms[system]
        answers = []
        for conv in _tqdm(conversations, desc=f"{system} answers", disable=not progress):
            out = llm.create_chat_completion(
                # Made plain before rendering: llama-cpp-python tokenizes the rendered prompt, specials parsed.
                messages=self.specials[system].messages(conv),
                seed=0,
                **sampling.llama_cpp(),
            )
            answers.append((out["choices"][0]["message"]["content"] or "").strip())
        return answers


def message_tokens(llm, messages: list[dict]) -> int:
    """The messages' tokens in a GGUF's own vocabulary (llm: a llama_cpp.Llama), plus a few per message for the chat
    template's markers. Text is tokenized as text (special=False), as llama.cpp's chat path does with message
    content; the messages must already be plain text for the model's special tokens (specials.py)."""
    text = sum(len(llm.tokenize(m["content"].encode(), add_bos=False, special=False)) for m in messages)
    return text + 8 * len(messages) + 8


def gguf_files(
    run: Run | None, gguf: str | Path | None, base_gguf: str | Path | None, systems: tuple[str, ...] = MODELS
) -> dict[str, Path]:
    """The GGUF that answers as each of `systems`, as the llama.cpp engine and the server choose it. Tuned: `gguf`,
    else the run's. Base: `base_gguf`, else the embedded GGUF when the run's base is the embedded model; left out when
    there is neither (the caller says what to pass)."""
    paths: dict[str, Path] = {}
    if "tuned" in systems:
        paths["tuned"] = check_gguf(gguf) if gguf else run.gguf()
    if "base" in systems:
        if base_gguf:
            paths["base"] = check_gguf(base_gguf)
        elif run is not None and run.is_embedded:
            paths["base"] = models.embedded_gguf()
    return paths


def check_gguf(path: str | Path) -> Path:
    """A GGUF path that exists and starts with the GGUF magic bytes."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"GGUF file {path} does not exist; check the path (train.py writes "
            "outputs/<run>/model.<type>.gguf: q8_0 on CPU, q4_k_m with a GPU preset), or leave --gguf out to use the "
            "run's own."
        )
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes).")
    return path


def load_engine(
    run: Run,
    engine: str = "transformers",
    systems: tuple[str, ...] = MODELS,
    use_merged: bool = False,
    gguf: str | Path | None = None,
    base_gguf: str | Path | None = None,
    threads: int | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
):
    """TransformersEngine or LlamaCppEngine for a run, loading only what `systems` needs. trust_remote_code: the
    command's own --trust-remote-code (a GGUF runs no Python, so only transformers reads it)."""
    bad = [s for s in systems if s not in MODELS]
    if bad or not systems:
        raise UserError(f"systems must be among {MODELS}, got {systems}.")
    if engine == "transformers":
        if gguf or base_gguf:
            raise UserError("--gguf/--base-gguf need --engine llamacpp.")
        return TransformersEngine(run, systems, use_merged, dtype, trust_remote_code)
    if engine == "llamacpp":
        if use_merged:
            raise UserError("--use-merged needs --engine transformers; with llamacpp pass --gguf FILE.")
        return LlamaCppEngine(run, systems=systems, gguf=gguf, base_gguf=base_gguf, threads=threads)
    raise UserError(f"--engine must be transformers or llamacpp, got {engine!r}.")


def ask(
    engine,
    questions: list[str],
    systems: tuple[str, ...] = MODELS,
    sampling: Sampling | None = None,
    progress: bool = False,
    index=None,
    k: int = RAG_K,
) -> dict[str, list]:
    """Answers per system for plain questions, each wrapped in the run's prompts (system prompt included). With a
    search index (retrieval.Index), also "<model>+rag" (the tuned model, or the only one asked, answering with the top
    k catalogue entries in its prompt) and "retrieved" (their titles, per question)."""
    ps = engine.run.prompts
    conversations = [prompts.messages(ps.system, q) for q in questions]
    sampling = (sampling or Sampling()).for_run(engine.run)
    hits = [index.search(q, k) for q in questions] if index is not None else None
    grounded = [prompts.rag_messages(ps, q, h) for q, h in zip(questions, hits, strict=True)] if hits else []
    for conv in conversations:
        check_length(engine, conv, sampling.max_new_tokens)
    for conv, found in zip(grounded, hits or [], strict=True):
        check_length(engine, conv, sampling.max_new_tokens, entries=len(found), k=k)
    out: dict[str, list] = {s: engine.generate(conversations, s, sampling, progress=progress) for s in systems}
    if index is not None:
        model = "tuned" if "tuned" in systems else systems[0]
        out[f"{model}+rag"] = engine.generate(grounded, model, sampling, progress=progress)
        out["retrieved"] = [[h["title"] for h in found] for found in hits]
    return out


def check_length(
    engine, conversation: list[dict], max_new_tokens: int, entries: int | None = None, k: int | None = None
) -> None:
    """Refuse, before generating, a prompt that leaves no room for the answer in the model's context: llama.cpp
    would raise mid-session, and transformers would spend minutes past its position limit producing garbage.

    entries: for a RAG prompt, how many catalogue entries it holds (k: the --rag-k that asked for them); then the
    message blames those, since the question alone was checked first."""
    room = engine.context - max_new_tokens
    used = engine.prompt_tokens(conversation)
    if used <= room:
        return
    reads = f"this model reads {engine.context:,} tokens including the {max_new_tokens} it may answer with"
    if entries is None:
        chars = len(conversation[-1]["content"])
        raise UserError(
            f"the question is too long: {chars:,} characters, {used:,} tokens with the prompt, and {reads} "
            "(--max-new-tokens). Shorten the question to a product title or a sentence about it."
        )
    fix = f"lower --rag-k (now {k})" if (k or entries) > 1 else "lower --max-new-tokens"
    raise UserError(
        f"the {entries:,} retrieved catalogue entries are too long for the model: with them the prompt takes "
        f"{used:,} tokens, and {reads} (--max-new-tokens). Fix: {fix}."
    )


def perplexity(nll: float, tokens: int) -> tuple[float | None, float | None]:
    """(mean loss, perplexity) from summed NLL; (None, None) when there were no tokens."""
    if tokens == 0:
        return None, None
    loss = nll / tokens
    return loss, math.exp(min(loss, 700.0))


def _tqdm(*args, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(*args, **kwargs)
