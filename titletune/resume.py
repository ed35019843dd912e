"""--resume: continue the same run, and only the same run.

A resumed run starts from the settings in its own run_config.yaml (`settings`); a flag given on the resume command
may change one (`changes`), and each resume appends what it changed to `resumes:` (`record`). Some settings make the
run another one: the base model, the LoRA adapter's shape and targets, the data and its order, the prompts. A resume
that changes one is refused before anything is written (`check_changes`). Every checkpoint carries the same settings
in titletune.json, written as it is saved (`mark`), and a resume from a checkpoint that another run saved is refused
as well (`check_checkpoints`). The checkpoint it starts from is the newest complete one (`last_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

import yaml

from titletune import files
from titletune.errors import UserError, flag
from titletune.runs import CONFIG, SECTIONS, as_dict, plain, read_config

log = logging.getLogger(__name__)

# Not carried into a resumed run: where it is (given again), which stages to run this time (a --prepare-only run is
# resumed to train), and every *_token field, which TrainingArguments.to_dict() writes masked ("<EOS_TOKEN>"), so
# run_config.yaml does not hold its value (they keep their defaults).
# trust_remote_code neither: only the resume command's own --trust-remote-code turns it on (Run.trust_remote_code).
NOT_RESUMED = ("output_dir", "resume", "overwrite", "prepare_only", "export_only", "run", "trust_remote_code")
# What makes a run the run it is. Changed on --resume, each of them would train another model into this folder:
# another base (or base precision) under the adapter, an adapter of another shape (the checkpoint does not load), or
# other products, phrasings or order than the ones its steps so far were trained on. Logging, saving, the step count,
# the evaluation and the export may change. data_workers is left out: the data is the same for any number.
IDENTITY = (
    "model_name_or_path", "model_revision", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
    "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
    "lora_modules_to_save", "use_rslora", "use_dora",
    "data", "title_field", "content_field", "max_samples", "val_size", "test_size", "min_content_chars",
    "max_content_chars", "passes", "rag_share", "rag_distractors", "rag_read", "prompts",
    "seed", "max_length",
)  # fmt: skip
PATHS = ("data", "prompts")  # compared as the files they name: data/x.json and /abs/.../data/x.json are one file
CHECKPOINT_FILE = "titletune.json"  # in every checkpoint-*/: the identity of the run that saved it


def settings(run_dir: str | Path) -> dict | None:
    """Every argument the run was started with, flat (flag name -> value), for --resume to start from; None when
    the folder holds no run_config.yaml (then --resume fails later, with its own message)."""
    if not (Path(run_dir) / CONFIG).is_file():
        return None
    config = read_config(Path(run_dir))
    flat = {"backend": config.get("backend")}
    for section in SECTIONS:
        values = (config.get(section) or {}).items()
        flat.update({k: v for k, v in values if k not in NOT_RESUMED and not k.endswith("_token")})
    return flat


def flat(parsed: tuple) -> dict:
    """Every parsed argument, flat: name -> value."""
    return {k: v for args in parsed for k, v in as_dict(args).items()}


def changes(original: dict, parsed: tuple, given: set[str]) -> dict:
    """The settings given now that differ from the run's own: {name: [old, new]}."""
    now = flat(parsed)
    changed = {k: [original.get(k), now[k]] for k in sorted(given) if k in now and k in original}
    return {k: v for k, v in changed.items() if plain(v[0]) != plain(v[1])}


def identity(values: dict) -> dict:
    """The settings of IDENTITY among `values` (flat), YAML-plain."""
    return {k: plain(values[k]) for k in IDENTITY if k in values}


def _same(name: str, old, new) -> bool:
    if name in PATHS and old and new:
        return Path(str(old)).expanduser().resolve() == Path(str(new)).expanduser().resolve()
    return plain(old) == plain(new)


def check_changes(run_dir: Path, changed: dict) -> None:
    """Refuse a resume that changes what makes the run (IDENTITY), before anything is written."""
    other = {k: v for k, v in changed.items() if k in IDENTITY and not _same(k, *v)}
    if not other:
        return
    listed = ", ".join(f"{flag(k)} {_show(old)} -> {_show(new)}" for k, (old, new) in other.items())
    flags = " ".join(f"{flag(k)} {shlex.quote(_show(new))}" for k, (_, new) in other.items())
    raise UserError(
        f"--resume continues the same run, and {listed} would make it another one (another base model, adapter, "
        f"data or prompts). Resume without {'it' if len(other) == 1 else 'them'}: python train.py --output-dir "
        f"{run_dir} --resume; or start a new run with them: python train.py --output-dir <new folder> {flags}"
    )


def _show(value) -> str:
    value = plain(value)
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def mark(checkpoint: Path, values: dict) -> Path:
    """Write the run's identity (of `values`, its flat settings) into a checkpoint folder it has just saved."""
    return files.write_atomic(checkpoint / CHECKPOINT_FILE, json.dumps(identity(values), indent=1) + "\n")


def check_checkpoints(run_dir: Path, values: dict) -> None:
    """Refuse to resume from checkpoints that another run saved: each titletune.json must agree with the run's
    settings. (A checkpoint without one predates it, or was cut short before it was written, and is let through.)"""
    mine = identity(values)
    for path in sorted(run_dir.glob(f"checkpoint-*/{CHECKPOINT_FILE}")):
        try:
            theirs = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(theirs, dict):
            continue
        differ = [k for k in mine if k in theirs and not _same(k, theirs[k], mine[k])]
        if differ:
            shown = ", ".join(f"{k} {_show(theirs[k])} (this run: {_show(mine[k])})" for k in differ)
            raise UserError(
                f"{path.parent} was saved by another run: {shown}. Resume the run it belongs to, or remove "
                f"{path.parent.name} from {run_dir} (or start afresh with --overwrite)."
            )


def record(run_dir: Path, changed: dict) -> Path | None:
    """Append one entry to run_config.yaml's `resumes`: the flags this resume gave with a new value, [old, new].
    Nothing else in the file changes: a resumed run is the same run. A folder without the file has nothing to
    resume (training.train then says so)."""
    if not (run_dir / CONFIG).is_file():
        return None
    config = read_config(run_dir)
    config["resumes"] = [*(config.get("resumes") or []), {"changed": changed}]
    return files.write_atomic(run_dir / CONFIG, yaml.safe_dump(plain(config), sort_keys=False, allow_unicode=True))


def last_checkpoint(run_dir: Path) -> str | None:
    """The newest complete checkpoint. A kill -9 during a save leaves a folder without trainer_state.json (written
    last), and a full disk or a copy cut short leaves one whose trainer_state.json does not parse; resuming from
    either fails inside the Trainer, so each is passed over, with a warning naming it."""
    numbered = [p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for path in sorted(numbered, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            if isinstance(state, dict) and isinstance(state.get("global_step"), int):
                return str(path)
        except (OSError, ValueError):
            pass
        log.warning("%s is incomplete (no readable trainer_state.json): passing over it", path.name)
    return None
