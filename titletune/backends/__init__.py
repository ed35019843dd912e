"""Two backends with the same five functions (check, load, add_lora, merge, free) and no base class.

`hf`: transformers + peft (+ bitsandbytes 4-bit), CPU or CUDA. `unsloth`: Unsloth's FastLanguageModel: its kernels
on CUDA, its own CPU backend (unsloth_zoo.cpu) without a GPU. `choose` and `load_backend` run before trl,
transformers or peft are imported, because unsloth must patch them on import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from types import ModuleType

from titletune import machine
from titletune.errors import UserError

NAMES = ("auto", "hf", "unsloth")


# --backend auto, per device, from bench/bench_train.py train_hf vs train_unsloth (bench/README.md). CUDA: Unsloth's
# kernels. A CPU without native bf16 (AVX2 only): Unsloth's CPU backend, 1.08x hf's tokens/s at the same losses
# (its chunked cross-entropy; both train the fp32 base there). A CPU with native bf16: hf, which trains a bf16 base
# (294 tok/s against Unsloth's 194 at 16-bit, on the AVX512-BF16 machine). A 4-bit base on CPU always takes hf,
# since Unsloth cannot merge it without a GPU, and so do several CPU processes.
AUTO = {"cuda": "unsloth", "cpu": "unsloth", "cpu_bf16": "hf"}


def choose(requested: str, load_in_4bit: bool = False) -> str:
    """Resolve 'auto' and check that the backend can run here; fails at once with the fix."""
    if requested not in NAMES:
        raise UserError(f"--backend must be one of {', '.join(NAMES)}, got {requested!r}.")
    world_size, sharding = launch()
    here = machine.device()
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "auto":
        # On CPU, Unsloth cannot merge a 4-bit base, and its CPU backend under several processes (gloo DDP) is
        # untested: hf, which tests/test_scale.py runs that way.
        on_cpu_only_hf = here != "cuda" and (load_in_4bit or world_size > 1)
        unsloth_fits = has_unsloth and not sharding and not on_cpu_only_hf
        return "unsloth" if AUTO[here] == "unsloth" and unsloth_fits else "hf"
    check_distributed(requested, world_size, sharding)
    if requested == "unsloth" and not has_unsloth:
        raise UserError(
            "--backend unsloth: unsloth is not installed. Run: make setup "
            "(or pip install --no-deps -r requirements-nodeps.txt after requirements-cpu.txt)"
        )
    return requested


def launch(env: Mapping[str, str] = os.environ) -> tuple[int, str | None]:
    """(processes, sharding) of this launch, from what the launcher exported: accelerate launch and torchrun set
    WORLD_SIZE; accelerate sets ACCELERATE_USE_FSDP or ACCELERATE_USE_DEEPSPEED for those configs (None for DDP)."""
    world_size = int(env.get("WORLD_SIZE") or 1)
    for name, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if str(env.get(flag, "")).lower() in ("1", "true", "yes"):
            return world_size, name
    return world_size, None


def check_distributed(backend: str, world_size: int, sharding: str | None) -> None:
    """Refuse the multi-process setups a backend cannot run to the end here.

    unsloth 2026.10.x supports DDP (read in 2026.10.7): its loader pins each rank to cuda:LOCAL_RANK (models/loader_utils.py
    prepare_device_map) and turns off DDP's find_unused_parameters under its checkpointing (models/_ddp_defaults.py).
    Sharded training is not wired: unsloth's own FSDP path wants FSDP2 (UNSLOTH_FSDP2=1; under FSDP1 it declines
    its fused LoRA kernels, models/fsdp2.py), and our unsloth merge reads the in-memory model, which FSDP and ZeRO-3
    have sharded across the ranks. The hf backend does both.
    """
    if backend != "unsloth" or world_size <= 1 or sharding is None:
        return
    raise UserError(
        f"--backend unsloth under {sharding} ({world_size} processes) is not supported: unsloth trains with several "
        "GPUs by DDP only here (accelerate launch --config_file configs/accelerate/ddp.yaml train.py ...). "
        f"For {sharding}, use --backend hf, e.g. accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml "
        "train.py --config configs/llama3_1_70b_fsdp_qlora.yaml --backend hf"
    )


def load_backend(name: str) -> ModuleType:
    """Import the chosen backend. For unsloth this imports unsloth itself, so the first call must come before
    trl/transformers/peft are imported; later calls (train.main after train.parse) find it imported and return."""
    if name == "unsloth" and "unsloth" not in sys.modules:
        patched = [m for m in ("trl", "transformers", "peft") if m in sys.modules]
        if patched:
            # Unsloth patches these on import; imported earlier, its speed-ups silently don't apply.
            raise RuntimeError(f"unsloth must be imported before {', '.join(patched)}; fix the import order.")
        import unsloth  # noqa: F401
    return importlib.import_module(f"titletune.backends.{name}")
