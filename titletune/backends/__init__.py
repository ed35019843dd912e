"""Two backends with the same four functions (load, add_lora, merge, free) and no base class.

`hf`: transformers + peft (+ bitsandbytes 4-bit), CPU or CUDA. `unsloth`: Unsloth's FastLanguageModel, CUDA only.
`choose` runs before trl, transformers or peft are imported, because unsloth must patch them on import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from titletune.errors import UserError

NAMES = ("auto", "hf", "unsloth")


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


def choose(requested: str) -> str:
    """Resolve 'auto' and check that the backend can run here; fails at once with the fix."""
    import torch

    if requested not in NAMES:
        raise UserError(f"--backend must be one of {', '.join(NAMES)}, got {requested!r}.")
    has_cuda = torch.cuda.is_available()
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "auto":
        return "unsloth" if has_cuda and has_unsloth else "hf"
    if requested == "unsloth":
        if not has_cuda:
            raise UserError("--backend unsloth needs an NVIDIA GPU with CUDA, and none is visible. "
                            "Use --backend hf (CPU or GPU), or --backend auto.")
        if not has_unsloth:
            raise UserError("--backend unsloth: unsloth is not installed. Run: pip install -r requirements.txt")
    return requested


def load_backend(name: str) -> ModuleType:
    """Import the chosen backend. For unsloth this imports unsloth itself, so call it before trl/transformers/peft."""
    if name == "unsloth":
        patched = [m for m in ("trl", "transformers", "peft") if m in sys.modules]
        if patched:
            # Unsloth patches these on import; imported earlier, its speed-ups silently don't apply.
            raise RuntimeError(f"unsloth must be imported before {', '.join(patched)}; fix the import order.")
        import unsloth  # noqa: F401
    return importlib.import_module(f"titletune.backends.{name}")
