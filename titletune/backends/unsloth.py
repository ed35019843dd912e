"""Unsloth's FastLanguageModel on CUDA: 4-bit QLoRA with its fused kernels. Follows Unsloth's own API exactly.

Imported only through backends.load_backend("unsloth"), which imports unsloth before trl, transformers and peft.
tests/test_unsloth_api.py checks every keyword passed here against the pinned unsloth's source, without a GPU.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from unsloth import FastLanguageModel

from titletune import models
from titletune.backends import torch_dtype


def load(base_model: str, model_args, trust_remote_code: bool = False, max_length: int = 2048, bf16: bool = False):
    """Load the base model and tokenizer; with --dtype auto Unsloth picks the dtype from the GPU (`bf16` unused)."""
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=base_model,
            max_seq_length=max_length,
            dtype=torch_dtype(model_args.dtype),  # None (auto): Unsloth picks bf16 where the GPU has it, else fp16
            load_in_4bit=model_args.load_in_4bit,
            trust_remote_code=trust_remote_code,
        )
    except OSError as e:
        raise models.hub_error(base_model, e) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def add_lora(model, model_args, training_args):
    return FastLanguageModel.get_peft_model(
        model,
        r=model_args.lora_r,
        target_modules=model_args.lora_target_modules,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,  # 0 keeps Unsloth's fast path
        bias="none",
        use_gradient_checkpointing="unsloth",  # offloads activations; ~30% less VRAM for a few % of speed
        random_state=training_args.seed,
        use_rslora=model_args.use_rslora,
        modules_to_save=model_args.lora_modules_to_save,
    )


def merge(
    model, tokenizer, base_model: str, adapter_dir: Path, out_dir: Path, trust_remote_code: bool = False
) -> Path:
    """Unsloth dequantizes the 4-bit base itself and writes 16-bit safetensors with the tokenizer."""
    model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")
    return out_dir


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
