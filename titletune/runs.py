"""Run folders: one per training run, holding everything infer.py, the evaluation and export need.

A finished run is loaded once, as a `Run` (its config, prompt set, base model and the paths of its adapter, merged
model and GGUF files), and that object is what generate, evaluate, export and infer.py are given. `read_config` is the
only code that opens run_config.yaml.

    <run>/run_config.yaml  every resolved argument     <run>/prompts/   the prompt set it was trained with
    <run>/data/            splits, stats, EDA           <run>/adapter/   LoRA adapter + tokenizer
    <run>/merged/          base + adapter, 16-bit       <run>/model.<type>.gguf, Modelfile, export.json
    <run>/report.{json,md,png}  the evaluation          <run>/train_log.jsonl, loss.png, checkpoint-*/
    <run>/README.md        the model card (card.py), also in adapter/ and merged/
    <run>/.lock            while a command writes to the run (lock.py)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import yaml

from titletune import base_models, claims, files, lock, ollama, prompts, ragrows
from titletune.config import EMBEDDED, ROOT, cache_dir
from titletune.errors import UserError

log = logging.getLogger(__name__)

OUTPUTS = ROOT / "outputs"
CONFIG = "run_config.yaml"
GGUF_PREFERENCE = ("q4_k_m", "q8_0", "f16", "bf16")  # the file a user would ship first, then the larger ones


def read_json(path: Path) -> dict | None:
    """A run file's JSON object, or None when it is missing, cut short or not an object (a run may be mid-write)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@dataclasses.dataclass(frozen=True)
class Run:
    """A run folder and its run_config.yaml, read once (`load`, `latest`)."""

    dir: Path
    config: dict

    @property
    def adapter(self) -> Path:
        return self.dir / "adapter"

    @property
    def merged(self) -> Path:
        return self.dir / "merged"

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def trained(self) -> bool:
        return (self.adapter / "adapter_config.json").is_file()

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 42))

    @property
    def max_length(self) -> int:
        return int(self.config.get("max_length") or 2048)

    def trust_remote_code(self, flag: bool) -> bool:
        """Whether to run Python code that comes with the model (auto_map in a config.json or tokenizer_config.json):
        only when the command that loads it was given --trust-remote-code (`flag`). The run folder's own
        trust_remote_code never counts: a run folder from elsewhere could ship code in adapter/ or merged/ and a
        run_config.yaml that turns it on. When the folder says true, one line says it was ignored."""
        note_ignored_trust(self.dir, self.config, flag)
        return flag

    @property
    def data_settings(self) -> dict:
        """The run's data arguments, over DataArguments' defaults for any it does not record: how training read,
        cleaned and cut its products, for the evaluation and the search index to do the same."""
        from titletune.config import DataArguments

        defaults = {f.name: f.default for f in dataclasses.fields(DataArguments)}
        return {**defaults, **{k: v for k, v in self.section("data").items() if v is not None}}

    def section(self, name: str) -> dict:
        """One argument group of the config (script, model, data, export, training); {} when absent."""
        return self.config.get(name) or {}

    @functools.cached_property
    def prompts(self) -> prompts.PromptSet:
        """The prompt set the run was trained with."""
        return prompts.load(self.dir / "prompts")

    @property
    def is_embedded(self) -> bool:
        """Whether the base model is the embedded SmolLM2-135M-Instruct (so its GGUF ships with the package)."""
        base = str(self.config.get("base_model", ""))
        if base == EMBEDDED or self.section("model").get("model_name_or_path") == EMBEDDED:
            return True
        # Runs written before "embedded" was recorded name the cached conversion's folder (SmolLM2-135M-Instruct-v3).
        path = Path(base).expanduser()
        return path.parent == cache_dir() / "models" and path.name.startswith(base_models.EMBEDDED_NAME)

    @property
    def base_model(self) -> str:
        """What from_pretrained loads for the base. The embedded model comes from today's cache, since a run written
        before the cache format changed names a folder that may be gone."""
        if self.is_embedded and not Path(str(self.config["base_model"])).is_dir():
            return base_models.resolve(EMBEDDED)
        return base_models.resolve(str(self.config["base_model"]))

    def gguf(self) -> Path:
        """The GGUF the run ships: the Modelfile's (export.json, else the Modelfile's FROM line); else q4_k_m, q8_0,
        f16, bf16, then any other, with a warning that names the file taken."""
        modelfile = (read_json(self.dir / "export.json") or {}).get("modelfile")
        shipped = modelfile.get("gguf") if isinstance(modelfile, dict) else None
        if not shipped and (self.dir / "Modelfile").is_file():
            shipped = ollama.gguf_name(self.dir / "Modelfile")
        if isinstance(shipped, str) and "/" not in shipped and (self.dir / shipped).is_file():
            return self.dir / shipped
        found = [self.dir / f"model.{kind}.gguf" for kind in GGUF_PREFERENCE]
        found = [path for path in found if path.is_file()] or sorted(self.dir.glob("*.gguf"))
        if found:
            log.warning(
                "%s: neither export.json nor a Modelfile says which GGUF the run ships; using %s (--gguf FILE picks "
                "another)",
                self.dir,
                found[0].name,
            )
            return found[0]
        raise UserError(
            f"{self.dir} has no GGUF export; pass --gguf FILE, or export one: "
            f"python train.py --export-only --run {self.dir} --gguf q4_k_m"
        )

    def split(self, name: str) -> list[dict]:
        """The rows of data/<name>.jsonl ([] when the run has none)."""
        return read_split(self.dir, name) if (self.data / f"{name}.jsonl").is_file() else []

    def read_products(self) -> list[dict]:
        """The products RAG-aware training only read (data/rag_read.jsonl, ragrows.py; [] without it)."""
        return ragrows.read_rows(self.data)


def read_split(run_dir: str | Path, split: str) -> list[dict]:
    """The rows of <run_dir>/data/<split>.jsonl, as the prepare stage wrote them."""
    import orjson

    from titletune.selection import SPLITS

    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}.")
    path = Path(run_dir) / "data" / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(
            f"{path} does not exist; prepare the data first: python train.py --prepare-only --output-dir {run_dir}"
        )
    with open(path, "rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]


def load(run_dir: str | Path) -> Run:
    """The run in `run_dir`; every problem is a UserError with the fix."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; pass a run in outputs/, or train: python train.py")
    return Run(run_dir, read_config(run_dir))


def latest(outputs_dir: str | Path = OUTPUTS) -> Run:
    """The newest finished run in outputs_dir: of the folders holding a trained adapter, the one whose
    run_config.yaml was written last. A run that failed or stopped before its adapter was saved is passed over."""
    outputs_dir = Path(outputs_dir)
    found = [c for c in outputs_dir.glob(f"*/{CONFIG}") if not c.parent.name.startswith(".")]  # not a run put aside
    configs = sorted(found, key=lambda p: p.stat().st_mtime)
    finished = [c.parent for c in configs if (c.parent / "adapter" / "adapter_config.json").is_file()]
    if finished:
        return load(finished[-1])
    if configs:
        raise UserError(
            f"no finished run in {outputs_dir}: {len(configs)} run folder(s) have no trained adapter (training failed "
            f"or was stopped), e.g. {configs[-1].parent}. Continue one with python train.py --output-dir "
            f"{configs[-1].parent} --resume, or train anew: python train.py"
        )
    raise UserError(f"no trained run in {outputs_dir} (no */{CONFIG}); train first: python train.py")


def load_or_latest(run_dir: str | Path | None, outputs_dir: str | Path = OUTPUTS) -> Run:
    return load(run_dir) if run_dir else latest(outputs_dir)


def resolve_dir(output_dir: str | None) -> Path:
    """'auto' (or nothing) -> outputs/<timestamp> (with -2, -3, ... when taken); anything else as given.

    Under several processes (accelerate launch, torchrun) every rank gets rank 0's timestamp: their clocks are read
    seconds apart, and each rank computing its own would split one run across several folders.
    """
    if not output_dir or output_dir == "auto":
        name = claims.unused_name(OUTPUTS, dt.datetime.now().strftime("run-%Y%m%d-%H%M%S"))
        return OUTPUTS / claims.from_rank_zero(name)
    return Path(output_dir).expanduser().resolve()


def check_target(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse, before anything is written, a run folder this command may not use: a file, a folder with files in it
    (unless --resume, or --overwrite of a titletune run), or no run to --resume."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output-dir {run_dir} is a file; give a folder.")
    busy = claims.busy(run_dir)
    if resume:
        if not busy:
            raise UserError(f"--resume: {run_dir} holds no run to resume. Run without --resume to start it.")
        if not (run_dir / CONFIG).is_file():
            raise UserError(f"--resume: {run_dir} is not a titletune run (no {CONFIG}); pass the run's own folder.")
        if not any(run_dir.glob("checkpoint-*")):
            raise UserError(f"--resume: no checkpoint-* folder in {run_dir}. Run without --resume to start afresh.")
        return
    if not busy:
        return
    if not overwrite:
        raise UserError(
            f"--output-dir {run_dir} already exists and is not empty. Pass --overwrite to replace it, "
            "--resume to continue it, or choose another --output-dir."
        )
    if not (run_dir / CONFIG).is_file():
        # Refuse to replace a folder we did not make: a typo must not wipe someone's files.
        raise UserError(f"--overwrite: {run_dir} is not a titletune run (no {CONFIG}); remove it yourself.")


@contextlib.contextmanager
def claimed(run_dir: Path, overwrite: bool, resume: bool) -> Iterator[claims.Claim]:
    """The run folder, made (or, with --overwrite, made anew) and locked for the block (lock.py).

    A new run that fails before it saved anything (no checkpoint, no adapter) is removed: it could not be resumed or
    served, and would look like the newest run and block a rerun. --overwrite moves the old run aside to
    .<name>.old-<time> beside it, and removes it once the new run has saved its first checkpoint (Claim.drop_previous,
    called by training) or finished; a new run that fails before that gets the old run back, untouched.
    """
    claim = create(run_dir, overwrite, resume)
    try:
        yield claim
        claim.drop_previous()
    except BaseException:
        if claim.new and not claim.saved():
            shutil.rmtree(run_dir, ignore_errors=True)
            claim.restore_previous()
        else:
            claim.drop_previous()
        raise
    finally:
        lock.release(claim.lock)


def create(run_dir: Path, overwrite: bool, resume: bool) -> claims.Claim:
    """Make and lock the run folder (check_target says what is allowed); --overwrite moves the old run aside."""
    check_target(run_dir, overwrite, resume)
    return claims.make(run_dir, resume)


def as_dict(obj) -> dict:
    if hasattr(obj, "to_dict"):  # TrainingArguments: turns enums into plain values
        return obj.to_dict()
    return dataclasses.asdict(obj)


def save_config(run_dir: Path, base_model: str, script, model, data, export, training) -> Path:
    """run_config.yaml: every resolved argument, so that the run folder alone reproduces and serves the run."""
    named = model.model_name_or_path
    config = {
        # "embedded" rather than today's cache folder, so the run folder stays valid on any machine
        "base_model": EMBEDDED if named in (None, "", EMBEDDED) else base_model,
        "backend": script.backend,
        "seed": training.seed,
        "trust_remote_code": training.trust_remote_code,
        "max_length": training.max_length,
        **{name: as_dict(args) for name, args in zip(SECTIONS, (script, model, data, export, training), strict=True)},
    }
    return files.write_atomic(run_dir / CONFIG, yaml.safe_dump(plain(config), sort_keys=False, allow_unicode=True))


def read_config(run_dir: Path) -> dict:
    """run_config.yaml of a run folder, as a dict: the one place that opens it."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise UserError(f"{run_dir} has no {CONFIG}, so it is not a finished run; pass --run outputs/<run>.")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path} is not readable YAML ({type(e).__name__}); the run's config is damaged. Train the run again, "
            "or restore run_config.yaml from a copy."
        ) from e
    if not isinstance(config, dict) or not config.get("base_model"):
        raise UserError(f"{path} must be a YAML mapping with base_model; did another version of train.py write it?")
    return config


SECTIONS = ("script", "model", "data", "export", "training")  # the argument dataclasses, as save_config writes them


def note_ignored_trust(run_dir: Path, config: dict | None = None, flag: bool = False) -> None:
    """One line when a run folder's config says trust_remote_code: true and the command was not given the flag."""
    config = read_config(Path(run_dir)) if config is None else config
    said = [config.get("trust_remote_code"), *((config.get(s) or {}).get("trust_remote_code") for s in SECTIONS)]
    if any(value is True for value in said) and not flag:
        log.warning(
            "%s says trust_remote_code: true; ignored, a run folder cannot turn on code execution. To run the Python "
            "code that comes with this model, pass --trust-remote-code.",
            Path(run_dir) / CONFIG,
        )


def plain(value):
    """Make a value YAML-safe: enums, paths and other objects become strings."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
