"""Two backends with the same four functions (load, add_lora, merge, free) and no base class.

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
from pathlib import Path
from types import ModuleType

from titletune.errors import UserError

NAMES = ("auto", "hf", "unsloth")


def bf16_supported() -> bool:
    """Whether bf16 pays here: a GPU with bf16, or a CPU with native bf16 (AVX512-BF16 / AMX); elsewhere on CPU it is
    emulated and slower than fp32. Imports torch: call it after choose()."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def torch_dtype(name: str | None):
    """--dtype as a torch dtype, or None for auto (the backend picks); a bad name is a UserError."""
    import torch

    if name in (None, "", "auto"):
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserError(f"--dtype must be auto, bfloat16, float16 or float32, got {name!r}.")
    return dtype


def requested_backend(argv: list[str]) -> str:
    """The --backend value from the CLI, else from the --config YAML, else 'auto'. Reads argv without argparse."""
    for flag in ("--backend",):
        if flag in argv and argv.index(flag) + 1 < len(argv):
            return argv[argv.index(flag) + 1]
        for arg in argv:
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        import yaml

        path = Path(argv[argv.index("--config") + 1])
        if path.is_file():
            config = yaml.safe_load(path.read_text()) or {}
            if isinstance(config, dict) and config.get("backend"):
                return str(config["backend"])
    return "auto"


# --backend auto, per device, from bench/bench_train.py (bench/README.md): on CUDA Unsloth's kernels; on CPU the
# backend measured faster at the same loss.
AUTO = {"cuda": "unsloth", "cpu": "hf"}


def choose(requested: str) -> str:
    """Resolve 'auto' and check that the backend can run here; fails at once with the fix."""
    import torch

    if requested not in NAMES:
        raise UserError(f"--backend must be one of {', '.join(NAMES)}, got {requested!r}.")
    world_size, sharding = launch()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "auto":
        return "unsloth" if AUTO[device] == "unsloth" and has_unsloth and not sharding else "hf"
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

    unsloth 2026.10.7 supports DDP: its loader pins each rank to cuda:LOCAL_RANK (models/loader_utils.py
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
