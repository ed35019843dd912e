"""The transformers engine (`TransformersEngine`): one base model in memory plus the run's LoRA adapter, base answers
coming from the same weights with the adapter switched off (`disable_adapter()`), so the model is loaded once; or the
run's merged/ folder. It answers (`generate`) and scores (`loss`, teacher-forced, as training did).

engines.load_engine picks it or the llama.cpp engine; both take their settings from sampling.py.
"""

from __future__ import annotations

import functools

from titletune import base_models, machine, specials, teacher
from titletune.errors import UserError
from titletune.runs import Run
from titletune.sampling import MODELS, Sampling


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
        from transformers import AutoTokenizer

        self.run = run
        self.systems = tuple(systems)
        self.max_length = run.max_length
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        trust = run.trust_remote_code(trust_remote_code)  # infer.py's --trust-remote-code; never the run folder's
        base_name = run.base_model
        load = functools.partial(_load_model, dtype=self._dtype(dtype), trust=trust, device=self.device)
        tokenizer_dir = self._load_models(load, base_name, use_merged)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust)
        self.specials = specials.from_tokenizer(self.tokenizer)
        self._set_tokens(tokenizer_dir)

    def _dtype(self, dtype: str):
        """The dtype to load in: `dtype` (--dtype), else what training used; auto: as saved, or on CPU as trained
        (bf16 autocast over a bf16 base)."""
        import torch

        run = self.run
        name = dtype if dtype != "auto" else run.section("model").get("dtype") or "auto"  # else what training used
        try:
            chosen = machine.torch_dtype(name)
        except UserError:
            raise UserError(f"{run.dir / 'run_config.yaml'}: model.dtype {name!r} is not a torch dtype.") from None
        if chosen is not None:
            return chosen
        trained_bf16 = bool(run.section("training").get("bf16"))
        cpu_bf16 = self.device == "cpu" and trained_bf16 and machine.bf16_supported()
        # Measured on CPU (bench/README.md): 1.3x fp32's tok/s under PASSIVE, 1.8x with spinning threads.
        return torch.bfloat16 if cpu_bf16 else "auto"

    def _load_models(self, load, base_name: str, use_merged: bool) -> str:
        """Load what `systems` needs (`load`: a model by name or folder) as self.base and self.tuned; the folder
        whose tokenizer goes with them."""
        self.base = self.tuned = None
        self._adapter = False
        if "tuned" not in self.systems:
            self.base = load(base_name)
            return base_name
        if use_merged:
            return self._load_merged(load, base_name)
        return self._attach_adapter(load, base_name)

    def _load_merged(self, load, base_name: str) -> str:
        """Tuned: the run's merged/ folder; base (when asked): the base model, loaded beside it."""
        merged_dir = self.run.merged
        if not (merged_dir / "config.json").is_file():
            raise UserError(f"{merged_dir} is missing; leave out --use-merged to apply adapter/ to the base.")
        self.tuned = load(str(merged_dir))
        if "base" in self.systems:
            self.base = load(base_name)
        return str(merged_dir)

    def _attach_adapter(self, load, base_name: str) -> str:
        """Tuned: the base with adapter/ on it; base: the same weights, the adapter switched off in generate()."""
        from peft import PeftModel

        adapter_dir = self.run.adapter
        if not (adapter_dir / "adapter_config.json").is_file():
            raise UserError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json); did training finish?")
        self.tuned = PeftModel.from_pretrained(load(base_name), str(adapter_dir)).eval()
        self.base = self.tuned  # same weights; generate() switches the adapter off for "base"
        self._adapter = True
        return str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else base_name

    def _set_tokens(self, tokenizer_dir: str) -> None:
        """The end tokens generation stops at, the pad token, left padding and the tokenizer's length limit."""
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
        from tqdm.auto import tqdm
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
        bar = tqdm(total=len(conversations), desc=f"{system} answers", disable=not progress)
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


def _load_model(name: str, dtype, trust: bool, device: str):
    """A causal LM by hub id or folder, on `device` and in eval mode; a failed download is a UserError."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust, use_safetensors=True)
    except OSError as e:
        raise base_models.hub_error(name, e) from None
    return model.to(device).eval()
