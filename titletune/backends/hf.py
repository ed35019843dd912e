"""transformers + peft, on CPU or CUDA; QLoRA through bitsandbytes 4-bit."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import get_peft_config, get_quantization_config

from titletune import base_models
from titletune.backends import launch
from titletune.machine import torch_dtype

log = logging.getLogger(__name__)


def _dtype(load_in_4bit: bool, bf16: bool = False) -> torch.dtype:
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # CPU with bf16 autocast (SFTConfig bf16=True, set where the CPU has native bf16): the frozen base in bf16 too.
    # Measured (bench/README.md): 1.08-1.19x the tokens/s of an fp32 base, 0.5 GB less, the same losses; autocast
    # would cast every fp32 weight to bf16 again on each forward. peft keeps the LoRA weights in fp32 either way.
    return torch.bfloat16 if load_in_4bit or bf16 else torch.float32


def _fsdp() -> bool:
    """Under accelerate launch with an FSDP config (configs/accelerate/fsdp_qlora.yaml)."""
    return launch()[1] == "FSDP"


def _device_map(quantized: bool) -> dict | None:
    # TRL 1.x has no get_kbit_device_map any more (its SFTTrainer places models itself); this is what it returned,
    # {"": local process index}, with FSDP's exception.
    if not (torch.cuda.is_available() and quantized) or _fsdp():
        # FSDP places (and shards) the weights itself; with cpu_ram_efficient_loading rank 0 loads, the rest wait.
        return None
    # 4-bit weights are quantized as they land on the GPU: each process on its own card, not all on cuda:0.
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


def check(model_args, export_args) -> None:
    """The hf backend finishes every configuration on CPU and CUDA; the unsloth backend refuses some here."""


def load(base_model: str, model_args, trust_remote_code: bool = False, max_length: int = 2048, bf16: bool = False):
    """Load the base model and tokenizer. `base_model` is a folder or hub id from base_models.resolve().

    bf16: training runs in bf16 (SFTConfig.bf16); on CPU the base is then loaded in bf16 rather than fp32.
    """
    quantization_config = _quantization_config(model_args)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            base_model,
            dtype=torch_dtype(model_args.dtype) or _dtype(model_args.load_in_4bit, bf16),
            quantization_config=quantization_config,
            attn_implementation=model_args.attn_implementation,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            device_map=_device_map(quantization_config is not None),
        )
    except OSError as e:
        raise base_models.hub_error(base_model, e) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    disable_bnb_cpu_repack(model)
    return model, tokenizer


def _quantization_config(model_args) -> BitsAndBytesConfig | None:
    """TRL's get_quantization_config for a 4-bit base (quant type, nested quant and storage from ModelConfig; FSDP
    shards only float tensors, so FSDP-QLoRA stores the packed 4-bit bytes as bf16 via bnb_4bit_quant_storage)."""
    if not model_args.load_in_4bit:
        return None  # --load-in-8bit is not a path titletune trains or merges: only a 4-bit base is quantized
    overrides = dataclasses.replace(
        model_args,
        # TRL computes in --dtype (our default "auto" is no torch dtype): 4-bit computes in the device's 16-bit dtype.
        dtype=str(_dtype(True)).removeprefix("torch."),
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type or "nf4",  # a preset's `null` means nf4, TRL's default
    )
    return get_quantization_config(overrides)


def disable_bnb_cpu_repack(model) -> int:
    """Turn off bitsandbytes' AVX512-BF16 CPU path on every 4-bit layer; returns how many were changed.

    Trap (measured): the first no-grad eval forward repacks the 4-bit weights for good, after which matmul_4bit
    takes a path without autograd and gradients through the frozen base are silently wrong while the loss still
    falls. Unsloth's CPU loader does the same.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def add_lora(model, model_args, training_args):
    """Wrap the model with a fresh LoRA adapter (r, alpha, dropout and targets from ModelConfig)."""
    sharded = model_args.load_in_4bit and _fsdp()
    if model_args.load_in_4bit and not sharded:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(training_args.gradient_checkpointing)
        )
    config = _lora_config(model_args)
    # Under FSDP every parameter of a wrapped unit must share one dtype: no fp32 upcast of the norms (skipped
    # above) or of the LoRA weights (autocast_adapter_dtype), as TRL's prepare_peft_model does for sharded QLoRA.
    return get_peft_model(model, config, autocast_adapter_dtype=not sharded)


def _lora_config(model_args) -> LoraConfig:
    """TRL's get_peft_config: r, alpha, dropout, target modules, modules to save, rsLoRA and DoRA from ModelConfig."""
    overrides = dataclasses.replace(
        model_args,
        use_peft=True,  # add_lora always adds one: train.py refuses --use-peft false; bench and tests pass bare configs
        lora_task_type="CAUSAL_LM",  # merge() reloads the base as an AutoModelForCausalLM
        lora_target_parameters=None,  # not passed by either backend: Unsloth's get_peft_model has no such option
    )
    return get_peft_config(overrides)


def merge(
    model, tokenizer, base_model: str, adapter_dir: Path, out_dir: Path, trust_remote_code: bool = False
) -> Path:
    """Base in 16-bit + adapter -> merge_and_unload -> safetensors + tokenizer (with its chat template) in out_dir.

    The base is reloaded from disk in 16-bit: merging into a 4-bit base would round the LoRA delta away.
    """
    del model
    free()
    dtype = torch.bfloat16
    base = AutoModelForCausalLM.from_pretrained(
        base_model, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del base, merged
    free()
    return out_dir


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
