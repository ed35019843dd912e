"""The training stage, shared by both backends: TRL's SFTTrainer on prompt/completion rows."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from transformers import TrainerCallback
from trl import SFTTrainer

from titletune import capacity
from titletune.errors import Problems, Terminated, UserError
from titletune.resume import last_checkpoint
from titletune.trainset import load_datasets, plain_rows

log = logging.getLogger(__name__)

LARGE = 10_000  # train rows from which tokenisation runs in several processes (dataset_num_proc)
# Answers tokenised for the capacity line's mean answer length: a seeded sample, so that a 1.3M-product split costs a
# read of the file and a second of tokenising, not minutes; the mean of 2,000 is close enough for a log-scale law.
ANSWER_SAMPLE = 2_000


@dataclass
class Outcome:
    steps: int
    interrupted: bool
    first_loss: float | None
    last_loss: float | None
    train_runtime: float | None
    stop_signal: int | None = None  # what stopped it: signal.SIGINT (Ctrl-C) or signal.SIGTERM


@dataclass
class Fitted:
    """What fit() leaves for the stages after it."""

    model: object
    tokenizer: object
    trainer: SFTTrainer
    outcome: Outcome
    question: str | None  # the question one trained product was asked, exactly as in training


@dataclass
class Rows:
    """What fit() makes the train rows of, besides the run's split files (trainset.load_datasets)."""

    prompt_set: object = None  # None: the run's own copy, <run>/prompts
    passes: int = 1  # views of each train product, each in another phrasing (--passes)
    rag_share: float = 0.0  # share of the products also asked with catalogue entries in the prompt (--rag-share)
    rag_distractors: float = 0.0  # share of those rows whose entries are distractors only (--rag-distractors)


def fit(
    backend,
    base_model: str,
    model_args,
    training_args,
    run_dir: Path,
    resume: bool,
    rows: Rows | None = None,
    callbacks: tuple = (),
) -> Fitted:
    """Model -> LoRA -> SFTTrainer -> train (or resume), on the run's prepared splits, each train product
    `rows.passes` times in as many phrasings (see Rows). The backend decides how the model is loaded and wrapped;
    everything after that is shared. `callbacks` are added to the Trainer's (e.g. OnSave)."""
    rows = rows or Rows()
    a = training_args
    # memory-mapped Arrow, not Python lists
    train_rows, val_rows = load_datasets(
        run_dir, rows.prompt_set, rows.passes, a.seed, rows.rag_share, rows.rag_distractors
    )
    products, answers = sample_answers(Path(run_dir) / "data" / "train.jsonl", ANSWER_SAMPLE, a.seed)
    model, tokenizer = backend.load(base_model, model_args, a.trust_remote_code, a.max_length, bf16=a.bf16)
    train_rows, val_rows = plain_rows(tokenizer, run_dir, train_rows, val_rows)
    model = backend.add_lora(model, model_args, training_args)
    trainable = _trainable(model, model_args)
    per_step = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
    epochs = a.max_steps * per_step / len(train_rows) if a.max_steps > 0 else a.num_train_epochs  # --max-steps wins
    views = rows.passes * epochs
    if a.process_index == 0:
        plan_capacity(trainable, products, capacity.mean_tokens(tokenizer, answers), views, run_dir)
    trainer = build_trainer(model, tokenizer, train_rows, val_rows, training_args, run_dir)
    _log_batches(products, rows.passes, len(train_rows), training_args, per_step)
    for callback in callbacks:
        trainer.add_callback(callback)
    outcome = train(trainer, run_dir, resume)
    log.info(
        "trained %d steps in %.0f s: loss %s -> %s",
        outcome.steps,
        outcome.train_runtime or 0,
        _fmt(outcome.first_loss),
        _fmt(outcome.last_loss),
    )
    question = train_rows[0]["prompt"][-1]["content"] if len(train_rows) else None
    return Fitted(model, tokenizer, trainer, outcome, question)


def _trainable(model, model_args) -> int:
    """The adapter's trainable parameters, logged beside the model's total."""
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "model %s: %.1fM trainable of %.1fM parameters (LoRA r=%d)",
        model_args.model_name_or_path,
        trainable / 1e6,
        total / 1e6,
        model_args.lora_r,
    )
    return trainable


def _log_batches(products: int, passes: int, n_rows: int, training_args, per_step: int) -> None:
    """One line: the products, the passes, the rows they make, and the batch of one optimizer step."""
    a = training_args
    log.info(
        "training on %d products x %d passes (+ RAG rows) = %d rows: batch %d per device x %d accumulation x %d "
        "processes = %d per step",
        products,
        passes,
        n_rows,
        a.per_device_train_batch_size,
        a.gradient_accumulation_steps,
        a.world_size,
        per_step,
    )


def sample_answers(path: Path, limit: int | None, seed: int) -> tuple[int, list[str]]:
    """The products in a split file, and the answers of up to `limit` of them (all with None), chosen uniformly with
    `seed` in one pass over the file (reservoir sampling); only the chosen lines are parsed."""
    import random

    import orjson

    rng, chosen, products = random.Random(seed), [], 0
    with open(path, "rb") as split:
        for line in split:
            if not line.strip():
                continue
            products += 1
            if limit is None or len(chosen) < limit:
                chosen.append(line)
            elif (j := rng.randrange(products)) < limit:
                chosen[j] = line
    answers = [" ".join(m["content"] for m in orjson.loads(line)["completion"]) for line in chosen]
    return products, answers


def plan_capacity(trainable: int, products: int, answer_tokens: float, views: float, run_dir: Path):
    """Before training: the capacity line (capacity.py), a one-line warning when the predicted seen recall is below
    config.CAPACITY_WARN, and <run>/capacity.json with the same figures for the model card and report.md. A JSON file
    of its own, not run_config.yaml: these are figures computed from the data and the model, like stats.json, not
    settings that --resume compares."""
    from titletune import files

    estimate = capacity.estimate(trainable, products, answer_tokens, views)
    log.info("%s", capacity.line(estimate))
    warning = capacity.warning(estimate)
    if warning:
        log.warning("%s", warning)
    files.write_atomic(Path(run_dir) / capacity.FILE, json.dumps(estimate.to_json(), indent=2) + "\n")
    return estimate


def save_adapter(fitted: Fitted, run_dir: Path) -> Path:
    """adapter/ (LoRA weights + tokenizer) and loss.png. Under FSDP the adapter is sharded: every rank helps gather
    it and rank 0 writes it; otherwise rank 0 saves its own copy."""
    adapter_dir = run_dir / "adapter"
    trainer = fitted.trainer
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(adapter_dir))
    if trainer.is_world_process_zero():
        if not trainer.is_fsdp_enabled:
            fitted.model.save_pretrained(adapter_dir, safe_serialization=True)
        fitted.tokenizer.save_pretrained(adapter_dir)
        plot_loss(trainer.state.log_history, run_dir / "loss.png")
        log.info("adapter in %s", adapter_dir)
    return adapter_dir


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


class JsonlLog(TrainerCallback):
    """Appends every Trainer log record (loss, lr, grad norm, eval loss) to train_log.jsonl as it happens."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


class StopOnSignal(TrainerCallback):
    """First Ctrl-C or SIGTERM (kill, docker stop, a job scheduler's notice): finish the current step, save a
    checkpoint, stop. A second one: abort at once."""

    SIGNALS: ClassVar[dict] = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self):
        self.requested: int | None = None  # the signal received
        self.previous = {signum: signal.getsignal(signum) for signum in self.SIGNALS}

    def install(self):
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    def uninstall(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.requested = signum
        name = self.SIGNALS[signum]
        print(f"\n{name}: stopping after this step and saving the adapter ({name} again to abort).", file=sys.stderr)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested is not None:
            control.should_training_stop = True
            control.should_save = True


class OnSave(TrainerCallback):
    """After each checkpoint is saved: the run's identity into it (resume.mark, checked by a later --resume), and
    `first()` once, after the first (--overwrite then removes the run this one replaces)."""

    def __init__(self, identity: dict, first=None):
        self.identity = identity
        self.first = first

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from titletune import resume

        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            resume.mark(checkpoint, self.identity)
        if self.first is not None:
            self.first, first = None, self.first
            first()


def check_args(training_args, problems: Problems | None = None) -> None:
    """Every training setting that cannot give a trained model, before any work (raised at once, or added to
    `problems` for the caller to raise with its own)."""
    a = training_args
    found = Problems() if problems is None else problems
    if not a.learning_rate > 0:
        found.add(
            f"--learning-rate must be > 0, got {a.learning_rate} (LoRA: about 2e-4 on a GPU preset; the CPU default 3e-3)"
        )
    if a.max_steps == 0 or a.max_steps < -1:
        found.add(
            f"--max-steps must be a positive number of optimizer steps, or -1 to train --num-train-epochs epochs; "
            f"got {a.max_steps}"
        )
    if a.max_steps == -1 and not a.num_train_epochs > 0:
        found.add(f"--num-train-epochs must be > 0 when --max-steps is -1, got {a.num_train_epochs}")
    found.at_least("--per-device-train-batch-size", a.per_device_train_batch_size, 1)
    found.at_least("--gradient-accumulation-steps", a.gradient_accumulation_steps, 1)
    if problems is None:
        found.done()


def build_trainer(model, tokenizer, train_ds, eval_ds, training_args, run_dir: Path):
    """SFTTrainer on conversational prompt/completion rows: the loss falls on the answer (and its end token) only."""
    if eval_ds is None and str(training_args.eval_strategy) not in ("no", "IntervalStrategy.NO"):
        training_args.eval_strategy = "no"
    if training_args.ddp_find_unused_parameters is None and training_args.world_size > 1:
        # Every LoRA weight gets a gradient at every step. transformers' default for a PeftModel (True) walks the
        # graph each step and breaks reentrant gradient checkpointing ("marked ready twice"); Unsloth sets False too.
        training_args.ddp_find_unused_parameters = False
    workers = min(4, (os.cpu_count() or 1) // 2)
    if training_args.dataset_num_proc is None and len(train_ds) > LARGE and workers > 1:
        # Measured: one process tokenises ~1,000 rows/s, so the full 1.25M-row train split takes ~20 minutes (once:
        # it is cached). Small sets lose more to worker start-up, and on 2 shared cores 2 workers were slower.
        training_args.dataset_num_proc = workers
    return SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
    )


def train(trainer, run_dir: Path, resume: bool) -> Outcome:
    """Run the trainer with live JSONL logging and clean Ctrl-C handling; resume from the last checkpoint if asked."""
    checkpoint = None
    if resume:
        checkpoint = last_checkpoint(run_dir)
        if checkpoint is None:
            raise UserError(f"--resume: no checkpoint-* folder in {run_dir}. Run without --resume to start afresh.")
        log.info("resuming from %s", checkpoint)
    stopper = StopOnSignal()
    trainer.add_callback(JsonlLog(run_dir / "train_log.jsonl"))
    trainer.add_callback(stopper)
    stopper.install()
    try:
        if checkpoint and _finished(checkpoint, trainer.args.max_steps):
            runtime = _restore_finished(trainer, checkpoint)
        else:
            runtime = trainer.train(resume_from_checkpoint=checkpoint).metrics.get("train_runtime")
    finally:
        stopper.uninstall()
    # TRL writes a hub model card here that names no base model ("fine-tuned version of None"): wrong, not useful.
    (run_dir / "README.md").unlink(missing_ok=True)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return Outcome(
        steps=trainer.state.global_step,
        interrupted=stopper.requested is not None,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        train_runtime=runtime,
        stop_signal=stopper.requested,
    )


def _finished(checkpoint: str, max_steps: int) -> bool:
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return max_steps > 0 and state["global_step"] >= max_steps


def _restore_finished(trainer, checkpoint: str) -> float | None:
    """A run killed after its last checkpoint, before the adapter was saved. Trap: the Trainer, resumed from a
    checkpoint that already reached max_steps in the middle of an epoch, trains one step more. So the checkpoint's
    LoRA weights and state are loaded instead, and nothing is trained."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    log.info("%s already reached max_steps %d: restoring it, nothing to train", checkpoint, trainer.args.max_steps)
    set_peft_model_state_dict(trainer.model, load_file(str(Path(checkpoint) / "adapter_model.safetensors")))
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    return None


def plot_loss(log_history: list[dict], path: Path) -> Path | None:
    """loss.png: train loss per logged step, and eval loss where there is one."""
    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log_history if "eval_loss" in r and "step" in r]
    if not train:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from titletune import files

    fig = Figure(figsize=(6, 3.5), dpi=120, layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
