"""Fine-tune an instruct LLM with LoRA / QLoRA so that it answers questions about the products in a catalogue.

CPU, no GPU and no model hub (embedded SmolLM2-135M-Instruct on the embedded sample, about 10 minutes on 2 cores):
    python train.py
CUDA, Unsloth 4-bit QLoRA on Llama 3.2 3B Instruct (configs/llama3_2_3b_qlora.yaml is the default with a GPU):
    python train.py --data data/trn.json --max-samples 100000
Another preset, any flag on top (flags beat the YAML, which beats the defaults in titletune/config.py):
    python train.py --config configs/mistral_7b_qlora.yaml --max-samples 100000 --num-train-epochs 2
Data only, re-export, resume:
    python train.py --prepare-only --data data/trn.json --max-samples 1000 --output-dir /tmp/prep
    python train.py --export-only --run outputs/run-20261122-101500 --gguf q4_k_m,q8_0
    python train.py --output-dir outputs/my-run --resume

Stages: data -> model -> SFTTrainer -> adapter -> merge -> GGUF + Modelfile -> evaluation report.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

from titletune import backends, models, runs
from titletune.config import (
    CPU_CONFIG,
    DEFAULTS,
    EMBEDDED,
    GPU_CONFIG,
    DataArguments,
    ExportArguments,
    ScriptArguments,
)
from titletune.errors import UserError, cli

log = logging.getLogger("titletune")


def parse(argv: list[str]):
    """Choose the backend (importing unsloth first if it is the one), then parse every flag with TrlParser."""
    import torch

    cuda = torch.cuda.is_available()
    # --resume continues the same run: its own settings are the defaults, and only flags given now change them.
    original = None
    if "--resume" in argv:
        original = runs.resume_settings(runs.resolve_dir(backends.requested(argv, "output_dir", "auto")))
    if original is None and "--config" not in argv and not any(a in argv for a in ("-h", "--help")):
        argv = ["--config", str(GPU_CONFIG if cuda else CPU_CONFIG), *argv]
    # The backend after the preset is known, so a preset's `backend:` counts; unsloth is imported here, once.
    fallback = original or {}
    load_in_4bit = backends.requested(argv, "load_in_4bit", str(fallback.get("load_in_4bit", "false")))
    requested = backends.requested(argv, "backend", str(fallback.get("backend") or "auto"))
    backend = backends.choose(requested, load_in_4bit.lower() in ("true", "1", "yes"))
    backends.load_backend(backend)
    from trl import ModelConfig, SFTConfig, TrlParser

    parser = TrlParser((ScriptArguments, ModelConfig, DataArguments, ExportArguments, SFTConfig))
    parser.description = __doc__.split("\n\n")[0]
    parser.epilog = (
        f"--config FILE  a YAML preset from configs/; its values replace the defaults, and flags beat it. "
        f"Without --config: {CPU_CONFIG.name} on CPU, {GPU_CONFIG.name} with CUDA. Every flag is "
        "accepted with dashes or underscores (--max-samples = --max_samples)."
    )
    machine = {
        "use_cpu": not cuda,
        "bf16": backends.bf16_supported(),
        "fp16": cuda and not torch.cuda.is_bf16_supported(),
    }
    parser.set_defaults_with_config(**DEFAULTS, **machine)
    if original:
        parser.set_defaults_with_config(**original)
    parsed = parser.parse_args_and_config(argv)
    script_args, model_args, data_args, export_args, training_args = parsed
    script_args.backend = backend
    given = {a.split("=", 1)[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
    if "num_train_epochs" in given and "max_steps" not in given and training_args.max_steps > 0:
        # max_steps, when set (the presets set it), beats epochs in the Trainer: the flag given here must win.
        log.info(
            "--num_train_epochs %s given: training for epochs, not the preset's max_steps %d",
            training_args.num_train_epochs,
            training_args.max_steps,
        )
        training_args.max_steps = -1
        given.add("max_steps")
    if original:  # recorded in run_config.yaml by main(): what this resume changed, [old, new]
        now = {k: v for args in parsed for k, v in runs.as_dict(args).items()}
        changed = {k: [original.get(k), now[k]] for k in sorted(given) if k in now and k in original}
        script_args.resume_changes = {k: v for k, v in changed.items() if runs.plain(v[0]) != runs.plain(v[1])}
    return script_args, model_args, data_args, export_args, training_args


@cli
def main(script_args, model_args, data_args, export_args, training_args):
    from titletune import data, export, models, prompts, runs, training

    backend = backends.load_backend(script_args.backend)  # already imported by parse(): returns the module
    gguf_types = export.parse_gguf_types(export_args.gguf)
    if script_args.export_only:
        return export_run(script_args, export_args, backend, gguf_types)
    backend.check(model_args, export_args)

    training.check_args(training_args)
    if not script_args.resume:  # a bad --data fails before a run folder exists that infer.py would take as the latest
        data.check_args(data_args)
        data.check_path(data_args.data)
    run_dir = runs.resolve_dir(training_args.output_dir)  # under several processes, the same folder on every rank
    training_args.output_dir = str(run_dir)
    main_process = training_args.process_index == 0
    # Under accelerate/torchrun, the main process makes the run folder and prepares the data; the others wait.
    with training_args.main_process_first(desc="run folder and data"):
        if main_process:
            runs.create(run_dir, script_args.overwrite, script_args.resume)
            log.info("run folder %s (backend %s)", run_dir, script_args.backend)
            if script_args.resume and (run_dir / runs.CONFIG).is_file():
                changed = getattr(script_args, "resume_changes", {})
                runs.record_resume(run_dir, changed)
                log.info("resume: the run's own settings%s", f", changed: {changed}" if changed else ", unchanged")
        # A new run that fails here must not look like a run: infer.py takes the newest; reruns need --overwrite.
        with runs.removed_on_failure(run_dir, enabled=main_process and not script_args.resume):
            # A resumed run reuses its own prompts and splits, so the data and its order are exactly the same.
            prompt_set = prompts.load(run_dir / "prompts" if script_args.resume else data_args.prompts)
            base_model = models.resolve(model_args.model_name_or_path)
            if main_process and not script_args.resume:
                runs.save_config(
                    run_dir,
                    # "embedded" rather than today's cache folder, so the run folder stays valid on any machine
                    base_model=EMBEDDED if model_args.model_name_or_path in (None, "", EMBEDDED) else base_model,
                    backend=script_args.backend,
                    seed=training_args.seed,
                    trust_remote_code=training_args.trust_remote_code,
                    max_length=training_args.max_length,
                    script=runs.as_dict(script_args),
                    model=runs.as_dict(model_args),
                    data=runs.as_dict(data_args),
                    export=runs.as_dict(export_args),
                    training=runs.as_dict(training_args),
                )
                prompts.save(prompt_set, run_dir)
                data.prepare_cached(data_args, training_args.seed, run_dir, prompt_set)
    if script_args.prepare_only:
        log.info("prepared data in %s/data (--prepare-only: stopping here)", run_dir)
        return run_dir
    # A failure before the first checkpoint (model load, tokenisation, a bad setting) removes the new run folder.
    with runs.removed_on_failure(run_dir, enabled=main_process and not script_args.resume):
        model, tokenizer, trainer, outcome, train_rows = _fit(
            backend, base_model, script_args, model_args, training_args, run_dir
        )

    adapter_dir = run_dir / "adapter"
    if trainer.is_fsdp_enabled:  # the adapter is sharded: every rank helps gather it, and rank 0 writes it
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(adapter_dir))
    if trainer.is_world_process_zero():
        if not trainer.is_fsdp_enabled:
            model.save_pretrained(adapter_dir, safe_serialization=True)
        tokenizer.save_pretrained(adapter_dir)
        training.plot_loss(trainer.state.log_history, run_dir / "loss.png")
    log.info(
        "trained %d steps in %.0f s: loss %s -> %s; adapter in %s",
        outcome.steps,
        outcome.train_runtime or 0,
        _fmt(outcome.first_loss),
        _fmt(outcome.last_loss),
        adapter_dir,
    )
    if outcome.interrupted:
        log.warning(
            "interrupted at step %d. Continue with: python train.py --output-dir %s --resume", outcome.steps, run_dir
        )
        sys.exit(130)
    if not trainer.is_world_process_zero():
        return run_dir  # merge, export and evaluation happen once, on the main process

    if export_args.merge or gguf_types:
        with runs.staged_dir(run_dir / "merged") as staged:  # a merge cut short leaves no merged/ to export from
            backend.merge(model, tokenizer, base_model, adapter_dir, staged, training_args.trust_remote_code)
        merged = run_dir / "merged"
        del model, trainer
        backend.free()
        log.info("merged model in %s", merged)
        if gguf_types:
            _export(run_dir, merged, gguf_types, prompt_set, tokenizer, export_args, _sample_question(train_rows))
    if script_args.eval_samples > 0:
        from titletune import evaluate

        evaluate.evaluate_run(run_dir, samples=script_args.eval_samples, seed=training_args.seed)
    question = _sample_question(train_rows) or "What is ...?"
    log.info("done: %s  (try: python infer.py --run %s %s)", run_dir, shlex.quote(str(run_dir)), shlex.quote(question))
    return run_dir


def _fit(backend, base_model, script_args, model_args, training_args, run_dir):
    """Model -> LoRA -> SFTTrainer -> train (or resume), on the run's prepared splits."""
    from titletune import training

    train_rows, val_rows = training.load_datasets(run_dir)  # memory-mapped Arrow, not Python lists

    # Model: the backend decides how it is loaded; everything after this is shared.
    model, tokenizer = backend.load(
        base_model, model_args, training_args.trust_remote_code, training_args.max_length, bf16=training_args.bf16
    )
    model = backend.add_lora(model, model_args, training_args)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "model %s: %.1fM trainable of %.1fM parameters (LoRA r=%d)",
        model_args.model_name_or_path,
        trainable / 1e6,
        total / 1e6,
        model_args.lora_r,
    )
    trainer = training.build_trainer(model, tokenizer, train_rows, val_rows, training_args, run_dir)
    world = training_args.world_size
    log.info(
        "training on %d products: batch %d per device x %d accumulation x %d processes = %d per step",
        len(train_rows),
        training_args.per_device_train_batch_size,
        training_args.gradient_accumulation_steps,
        world,
        training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world,
    )
    outcome = training.train(trainer, run_dir, script_args.resume)
    return model, tokenizer, trainer, outcome, train_rows


def export_run(script_args, export_args, backend, gguf_types):
    """--export-only: merge (if needed) and re-export an existing run."""
    from transformers import AutoTokenizer

    from titletune import models, prompts, runs

    if not script_args.run:
        raise UserError("--export-only needs --run <run folder>, e.g. --run outputs/run-20261122-101500")
    run_dir = Path(script_args.run)
    config = runs.load_config(run_dir)
    adapter_dir = run_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{run_dir} has no trained adapter ({adapter_dir}); finish training first.")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    merged = run_dir / "merged"
    if not (merged / "config.json").is_file():
        from titletune.backends import hf  # merging from disk needs no unsloth: base in 16-bit + adapter

        base = models.resolve(config["base_model"])
        with runs.staged_dir(merged) as staged:
            hf.merge(None, tokenizer, base, adapter_dir, staged, bool(config.get("trust_remote_code")))
    prompt_set = prompts.load(run_dir / "prompts")
    if gguf_types:
        _export(run_dir, merged, gguf_types, prompt_set, tokenizer, export_args)
    return run_dir


def _export(run_dir, merged, gguf_types, prompt_set, tokenizer, export_args, question: str | None = None):
    """GGUF files, Modelfile and export.json beside the run; each GGUF is loaded and asked `question`."""
    from titletune import export

    return export.export(
        run_dir,
        merged,
        gguf_types,
        prompt_set.system,
        tokenizer,
        verify=export_args.verify,
        llama_cpp_dir=export_args.llama_cpp_dir,
        question=question,
    )


def _sample_question(rows: list[dict]) -> str | None:
    """The question one trained product was asked with, exactly as in training."""
    return rows[0]["prompt"][-1]["content"] if rows else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    models.disable_telemetry()  # before trl, datasets and huggingface_hub are imported
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    args = cli(parse)(sys.argv[1:])  # a bad flag, or Ctrl-C during the imports: one line, no traceback
    main(*args)
