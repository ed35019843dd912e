"""Fine-tune an instruct LLM with LoRA / QLoRA so that it answers questions about the products in a catalogue.

CPU, no GPU and no model hub (embedded SmolLM2-135M-Instruct on the embedded sample; about 30 minutes on 2 cores):
    python train.py
CUDA, Unsloth 4-bit QLoRA on Llama 3.2 3B Instruct (configs/llama3_2_3b_qlora.yaml is the default with a GPU):
    python train.py --data data/trn.json --max-samples 100000
Another preset, any flag on top (flags beat the YAML, which beats the defaults in titletune/config.py):
    python train.py --config configs/mistral_7b_qlora.yaml --max-samples 100000 --num-train-epochs 2
Data only, re-export, resume:
    python train.py --prepare-only --data data/trn.json --max-samples 1000 --output-dir /tmp/prep
    python train.py --export-only --run outputs/run-20261122-101500 --gguf q4_k_m,q8_0
    python train.py --output-dir outputs/my-run --resume

Stages: data -> model -> SFTTrainer -> adapter -> merge -> GGUF + Modelfile -> evaluation report -> model card.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shlex
import signal
import sys

from titletune import backends, base_models, config, logs, machine, prepare, prompts, resume, runs
from titletune.config import DEFAULTS, GPU_CONFIG, DataArguments, ExportArguments, ScriptArguments
from titletune.errors import Problems, UserError, cli, full_disk_is_user_error

log = logging.getLogger("titletune")


@dataclasses.dataclass
class Invocation:
    """What train.py runs with: TrlParser's five argument objects, and what parse decided before them."""

    script: ScriptArguments
    model: object  # trl.ModelConfig
    data: DataArguments
    export: ExportArguments
    training: object  # trl.SFTConfig
    resume_changes: dict  # what a --resume changed, {name: [old, new]} (run_config.yaml records it); {} otherwise

    @property
    def groups(self) -> tuple:
        """The five argument objects, in the order run_config.yaml and resume.flat take them."""
        return self.script, self.model, self.data, self.export, self.training


def parse(argv: list[str]) -> Invocation:
    """Choose the backend (importing unsloth first if it is the one), then parse every flag with TrlParser.
    script.backend is the backend chosen, as run_config.yaml records it."""
    import torch

    cuda = torch.cuda.is_available()
    asked = config.asked(argv)
    # --resume continues the same run: its own settings are the defaults, and only flags given now change them.
    original, resumed = None, None
    if "resume" in asked.flags:
        resumed = runs.resolve_dir(asked.value("output_dir", "auto"))
        original = resume.settings(resumed)
    if cuda and original is None and "config" not in asked.flags and not any(a in argv for a in ("-h", "--help")):
        argv = ["--config", str(GPU_CONFIG), *argv]
        asked = config.asked(argv)
    # The backend once the config is known, so a preset's `backend:` counts; unsloth is imported here, once.
    fallback = {**DEFAULTS, "backend": "auto", **(original or {})}
    load_in_4bit = asked.value("load_in_4bit", str(fallback["load_in_4bit"]))
    backend = backends.choose(
        asked.value("backend", str(fallback["backend"] or "auto")), load_in_4bit.lower() in ("true", "1", "yes")
    )
    backends.load_backend(backend)
    from trl import ModelConfig, SFTConfig, TrlParser

    parser = TrlParser((ScriptArguments, ModelConfig, DataArguments, ExportArguments, SFTConfig))
    parser.description = __doc__.split("\n\n")[0]
    parser.epilog = (
        "--config FILE  a YAML preset from configs/; its values replace the defaults, and flags beat it. The "
        f"defaults shown are the CPU run (titletune/config.py); with CUDA and no --config, {GPU_CONFIG.name} is "
        "laid over them. Every flag is accepted with dashes or underscores (--max-samples = --max_samples)."
    )
    machine_defaults = {
        "use_cpu": not cuda,
        "bf16": machine.bf16_supported(),
        "fp16": cuda and not machine.bf16_supported(),
    }
    parser.set_defaults_with_config(**{**DEFAULTS, **machine_defaults, **(original or {})})
    parsed = parser.parse_args_and_config(argv)
    inv = Invocation(*parsed[:5], resume_changes={})
    inv.script.backend = backend
    if not inv.model.use_peft:
        raise UserError(
            "--use-peft false asks for full fine-tuning, which titletune does not do: it trains LoRA adapters (QLoRA "
            "on a GPU) and merges them. Leave the flag out, and raise --lora-r for more capacity (README: Will it fit?)."
        )
    if inv.data.rag_share > 0 and "max_length" not in asked.names and inv.training.max_length < config.RAG_MAX_LENGTH:
        inv.training.max_length = config.RAG_MAX_LENGTH  # room for the entries of a RAG row (config.py)
    if original:  # recorded in run_config.yaml by main(): what this resume changed, [old, new]
        inv.resume_changes = resume.changes(original, parsed, asked.names)
        runs.note_ignored_trust(resumed, flag=inv.training.trust_remote_code)  # not resumed: only this command's flag
    return inv


@cli
def main(inv: Invocation):
    from titletune import export, training

    args = inv.groups
    script_args, model_args, data_args, export_args, training_args = args
    backend = backends.load_backend(script_args.backend)  # already imported by parse(): returns the module
    problems = Problems()  # every problem with the flags, said at once
    gguf_types = export.check_args(export_args, problems)
    if not script_args.export_only:
        training.check_args(training_args, problems)
        prepare.check_args(data_args, problems)
    problems.done()
    if script_args.export_only:
        return export_only(script_args.run, gguf_types, export_args, training_args.trust_remote_code)
    run_dir = runs.resolve_dir(training_args.output_dir)  # under several processes, the same folder on every rank
    training_args.output_dir = str(run_dir)
    prompt_set, base_model = check(backend, run_dir, gguf_types, inv)
    main_process = training_args.process_index == 0
    # The main process makes and locks the run folder (runs.claimed); under accelerate/torchrun the others wait.
    claimed = runs.claimed(run_dir, script_args.overwrite, script_args.resume) if main_process else None
    with full_disk_is_user_error(run_dir, lambda: _go_on(run_dir)), claimed or contextlib.nullcontext() as claim:
        # 1. Run folder and data.
        with training_args.main_process_first(desc="run folder and data"):
            if main_process:
                log.info("run folder %s (backend %s)", run_dir, script_args.backend)
                if script_args.resume:
                    changed = inv.resume_changes
                    resume.record(run_dir, changed)
                    log.info("resume: the run's own settings%s", f", changed: {changed}" if changed else ", unchanged")
                else:
                    runs.save_config(run_dir, base_model, *args)
                    prompts.save(prompt_set, run_dir)
                    prepare.prepare_cached(data_args, training_args.seed, run_dir, prompt_set)
        if script_args.prepare_only:
            log.info("prepared data in %s/data (--prepare-only: stopping here)", run_dir)
            return run_dir

        # 2. Model, LoRA, SFTTrainer. A new run that fails before its first checkpoint is removed (runs.claimed).
        on_save = training.OnSave(resume.identity(resume.flat(args)), first=claim.drop_previous if claim else None)
        fitted = training.fit(
            backend, base_model, model_args, training_args, run_dir, script_args.resume,
            training.Rows(prompt_set, data_args.passes, data_args.rag_share, data_args.rag_distractors),
            callbacks=(on_save,),
        )  # fmt: skip
        training.save_adapter(fitted, run_dir)
        if fitted.outcome.interrupted:
            stopped(fitted, run_dir)
        if not fitted.trainer.is_world_process_zero():
            return run_dir  # merge, export and evaluation happen once, on the main process

        # 3. Merge, GGUF + Modelfile, the before/after report and the model card.
        return finish(fitted, backend, base_model, run_dir, gguf_types, script_args, export_args, training_args)


def check(backend, run_dir, gguf_types, inv: Invocation):
    """Every check that can be made before anything is written, after the flags (main): the run folder, a resume's
    changes, the data, the prompt set, the model, and what the stages after training will need (preflight.py). A
    failure here leaves every folder as it was. Returns the prompt set and the base model."""
    from titletune import preflight

    script_args, model_args, data_args, export_args, training_args = inv.groups
    backend.check(model_args, export_args)
    runs.check_target(run_dir, script_args.overwrite, script_args.resume)
    if script_args.resume:  # a resumed run reuses its own prompts and splits: the same data in the same order
        resume.check_changes(run_dir, inv.resume_changes)
        resume.check_checkpoints(run_dir, resume.flat(inv.groups))
        prompt_set = prompts.load(run_dir / "prompts")
    else:
        prepare.check_path(data_args.data)
        prompt_set = prompts.load(data_args.prompts)
    base_model = base_models.resolve(model_args.model_name_or_path)
    if not script_args.prepare_only:
        preflight.check(prompt_set, base_model, script_args, export_args, training_args, gguf_types)
    return prompt_set, base_model


def stopped(fitted, run_dir) -> None:
    """Ctrl-C or SIGTERM stopped training after a step: the adapter so far is saved; say how to go on, and exit
    130 or 143 as a process killed by that signal would."""
    from titletune import card

    if fitted.trainer.is_world_process_zero():
        card.write(runs.load(run_dir))  # of the adapter saved so far; the resumed run writes it again
    signum = fitted.outcome.stop_signal or signal.SIGINT
    log.warning(
        "interrupted at step %d (%s). Continue with: python train.py --output-dir %s --resume",
        fitted.outcome.steps,
        signal.Signals(signum).name,
        run_dir,
    )
    sys.exit(128 + signum)


def finish(fitted, backend, base_model, run_dir, gguf_types, script_args, export_args, training_args):
    """Merge, GGUF + Modelfile, the before/after report and the model card, on the main process."""
    from titletune import files, pipeline

    question = fitted.question or "What is ...?"
    if export_args.merge or gguf_types:
        with files.staged_dir(run_dir / "merged") as staged:  # a merge cut short leaves no merged/ to export from
            backend.merge(
                fitted.model,
                fitted.tokenizer,
                base_model,
                run_dir / "adapter",
                staged,
                training_args.trust_remote_code,
            )
        del fitted
        backend.free()
        log.info("merged model in %s", run_dir / "merged")
    run = runs.load(run_dir)
    settings, engine = None, None
    if script_args.eval_samples > 0:
        from titletune import engines, evaluate

        settings = evaluate.EvalSettings(
            script_args.eval_samples, rag_k=script_args.rag_k, rag_index=script_args.rag_index
        )
        options = engines.EngineOptions(trust_remote_code=training_args.trust_remote_code)
        engine = engines.load_engine(run, options=options)
    pipeline.finish(
        run,
        gguf_types,
        export_args if gguf_types else None,
        question,
        settings,
        engine,
        training_args.trust_remote_code,
    )
    log.info("done: %s  (try: python infer.py --run %s %s)", run_dir, shlex.quote(str(run_dir)), shlex.quote(question))
    return run_dir


def export_only(run_dir: str | None, gguf_types: list[str], export_args, trust_remote_code: bool = False):
    """--export-only: merge (when merged/ is missing), GGUF, Modelfile and card of a finished run, under its lock."""
    from titletune import lock, pipeline

    if not run_dir:
        raise UserError("--export-only needs --run <run folder>, e.g. --run outputs/run-20261122-101500")
    run = runs.load(run_dir)
    again = f"export again: python train.py --export-only --run {shlex.quote(str(run.dir))}"
    with full_disk_is_user_error(run.dir, lambda: again), lock.held(run.dir):
        pipeline.finish(run, gguf_types, export_args, trust_remote_code=trust_remote_code)
    return run.dir


def _go_on(run_dir) -> str:
    """After a full disk: continue the run if it saved something to continue from, else run it again."""
    if (run_dir / "adapter").is_dir() or any(run_dir.glob("checkpoint-*")):
        return f"continue the run with: python train.py --output-dir {shlex.quote(str(run_dir))} --resume"
    return "run the same command again"


if __name__ == "__main__":
    base_models.disable_telemetry()  # before trl, datasets and huggingface_hub are imported
    logs.setup()  # the same: they read their progress-bar settings at import
    invocation = cli(parse)(sys.argv[1:])  # a bad flag, or Ctrl-C during the imports: one line, no traceback
    main(invocation)
