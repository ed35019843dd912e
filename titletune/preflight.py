"""What the stages after training need, checked before training starts.

A run must not train for hours and then stop at its export or its evaluation over something that was known at the
start. Each check here is one a later stage makes again for itself (so `train.py --export-only` and
`infer.py evaluate` keep theirs); train.main calls them all before any folder is touched.
"""

from __future__ import annotations

from pathlib import Path

from titletune import base_models, ollama
from titletune.errors import UserError


def check(prompt_set, base_model: str, script_args, export_args, training_args, gguf_types: list[str]) -> None:
    """Every check below, the cheap ones first."""
    modelfile(prompt_set, gguf_types)
    evaluation(script_args)
    gguf_tools(export_args, gguf_types)
    chat_template(base_model, training_args.trust_remote_code, prompt_set, gguf_types)


def modelfile(prompt_set, gguf_types: list[str]) -> None:
    """The Ollama Modelfile, written beside the GGUF, can hold the system prompt (ollama.write_modelfile)."""
    if gguf_types:
        ollama.check_system(prompt_set.system)


def evaluation(script_args) -> None:
    """The evaluation after training can run as asked (evaluate.evaluate_run)."""
    if script_args.eval_samples < 0:
        raise UserError(f"--eval-samples must be >= 0 (0 skips the evaluation), got {script_args.eval_samples}.")
    if script_args.rag_index:
        path = Path(script_args.rag_index).expanduser()
        if not path.is_file():
            raise UserError(
                f"--rag-index {script_args.rag_index}: no such file; give a trn-format file (e.g. data/trn.json), "
                "or leave --rag-index out to search the run's training products."
            )
    if script_args.eval_samples > 0:
        from titletune.evaluate import EvalSettings

        EvalSettings(script_args.eval_samples, rag_k=script_args.rag_k, rag_index=script_args.rag_index).check()


def gguf_tools(export_args, gguf_types: list[str]) -> None:
    """The GGUF export has llama-cpp-python, sentencepiece and the converter (converter.convert): set-up fetched it
    into the cache; without it, the fix is said now rather than after training."""
    if not gguf_types:
        return
    from titletune import converter

    converter.llama_cpp_version()
    converter.check_sentencepiece()
    converter.find_converter(export_args.llama_cpp_dir)


def chat_template(base_model: str, trust_remote_code: bool, prompt_set, gguf_types: list[str]) -> None:
    """The base's tokenizer has a chat template (training renders every row through it) and, for a GGUF, one that
    ends an answer with a special token (export.export, fidelity.end_token)."""
    from transformers import AutoTokenizer

    from titletune import export, fidelity, prompts

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise base_models.hub_error(base_model, e) from e
    if not isinstance(getattr(tokenizer, "chat_template", None), str) or not tokenizer.chat_template:
        raise UserError(
            f"the tokenizer of {base_model} has no chat template, so its rows cannot be rendered as chats and no GGUF "
            "of it would chat correctly; pass an instruct (chat) model as --model-name-or-path."
        )
    if gguf_types:
        question, answer = export.EXAMPLE
        fidelity.end_token(
            tokenizer, fidelity.Sample("example", prompts.messages(prompt_set.system, question), answer)
        )
