"""Unsloth's FastLanguageModel: 4-bit QLoRA with its fused kernels on CUDA; its own CPU backend without a GPU.

Imported only through backends.load_backend("unsloth"), which imports unsloth before trl, transformers and peft.
Without a GPU, `import unsloth` swaps in unsloth_zoo.cpu.FastCPUModel (stock transformers + peft, chunked
cross-entropy) and patches SFTConfig/SFTTrainer for the whole process. Every CPU-specific choice is in this file.
tests/test_unsloth_api.py checks every keyword passed here against the pinned source, CUDA and CPU loaders both.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from unsloth import FastLanguageModel

from titletune import base_models
from titletune.errors import UserError
from titletune.machine import torch_dtype

CUDA = torch.cuda.is_available()


def check(model_args, export_args) -> None:
    """Refuse, before any work, what Unsloth cannot finish on this device."""
    if not CUDA and model_args.load_in_4bit:
        # unsloth_zoo.cpu: save_pretrained_merged from a 4-bit base raises "not supported on CPU yet", so the
        # run would train and then fail at the merge. The hf backend merges a bitsandbytes 4-bit run on CPU.
        raise UserError(
            "--backend unsloth with --load-in-4bit on CPU: Unsloth cannot merge a 4-bit base without a GPU. "
            "Use --load-in-4bit false (a 16-bit base, the CPU default), or --backend hf for bitsandbytes 4-bit."
        )


def load(base_model: str, model_args, trust_remote_code: bool = False, max_length: int = 2048, bf16: bool = False):
    """Load the base model and tokenizer; with --dtype auto Unsloth picks the dtype (`bf16` unused): on CUDA bf16
    where the GPU has it, else fp16; on CPU bf16 where the CPU has native bf16, else fp32."""
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=base_model,
            max_seq_length=max_length,
            dtype=torch_dtype(model_args.dtype),
            load_in_4bit=model_args.load_in_4bit,
            trust_remote_code=trust_remote_code,
        )
    except OSError as e:
        raise base_models.hub_error(base_model, e) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def add_lora(model, model_args, training_args):
    """LoRA through Unsloth, which also sets up gradient checkpointing, so the Trainer must not do it again."""
    # CUDA: "unsloth" offloads activations to host RAM (~30% less VRAM for a few % of speed). CPU: activations are
    # already in host RAM, and "unsloth" is plain recomputation that cost ~20% of tokens/s (bench/README.md), so the
    # run's own --gradient-checkpointing setting (off in the CPU default) is used.
    checkpointing = "unsloth" if CUDA else bool(training_args.gradient_checkpointing)
    model = FastLanguageModel.get_peft_model(
        model,
        r=model_args.lora_r,
        target_modules=model_args.lora_target_modules,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,  # 0 keeps Unsloth's fast path
        bias="none",
        use_gradient_checkpointing=checkpointing,
        random_state=training_args.seed,
        use_rslora=model_args.use_rslora,
        modules_to_save=model_args.lora_modules_to_save,
    )
    training_args.gradient_checkpointing = False  # done above; the Trainer's own would wrap the layers twice
    return model


def merge(
    model, tokenizer, base_model: str, adapter_dir: Path, out_dir: Path, trust_remote_code: bool = False
) -> Path:
    """Unsloth writes 16-bit safetensors with the tokenizer: on CUDA it dequantizes the 4-bit base itself; on CPU
    it merges the 16-bit base (written as float16)."""
    model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")
    return out_dir


def free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
