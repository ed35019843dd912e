"""The Ollama Modelfile beside a run's GGUF: its chat template, system prompt, stop tokens and parameters."""

from __future__ import annotations

from pathlib import Path

from titletune import files, llamacpp
from titletune.errors import UserError

# End-of-turn tokens of the common chat formats (ChatML, Llama 3, Llama 2/Mistral, Phi-3, Gemma). Ollama stops on
# the GGUF's EOS by itself; listing the end-of-turn tokens too keeps a model that never emits EOS from running on.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|end|>", "<end_of_turn>")

# The report's decoding (engines.Sampling's defaults), so that `ollama run` answers as the scored model does: greedy
# (temperature 0; any other value makes answers differ from the report, and from run to run) and no repetition
# penalty (Ollama before 0.32.10 applies 1.1 when none is given, which changes recalled descriptions and keeps an exact
# recall from stopping after it). export_run adds num_predict, the run's answer length. The README, "Use the GGUF",
# says which Ollama versions do what.
PARAMS = {"temperature": 0, "repeat_penalty": 1, "num_ctx": llamacpp.N_CTX}

# Ollama does not run Jinja. `ollama create` picks a Go template by Levenshtein distance (< 100) between the GGUF's
# tokenizer.chat_template and the Jinja templates it knows (ollama/ollama template/template.go, Named); with no match
# it silently uses "{{ .Prompt }}", i.e. no chat format at all. Measured against its template/index.json: SmolLM2's
# template matches chatml (distance 41) and Llama 3.1's matches exactly, but Llama 3.2's (3,827 chars, with tools and
# dates) is >= 787 edits from every entry, and so are Mistral's. So the Modelfile always names the template: these are
# Ollama's own chatml, llama3-instruct and mistral-instruct templates, chosen by each format's marker tokens.
TEMPLATES = {
    "chatml": (
        "<|im_start|>",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
    ),
    "llama3": (
        "<|start_header_id|>",
        (
            "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
            "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
    ),
    "mistral": (
        "[INST]",
        (
            '[INST] {{ range $index, $_ := .Messages }}\n{{- if eq .Role "system" }}{{ .Content }}\n\n'
            '{{ else if eq .Role "user" }}{{ .Content }}[/INST]\n'
            '{{- else if eq .Role "assistant" }} {{ .Content }}</s>[INST] {{ end }}\n{{- end }}'
        ),
    ),
}


def stop_tokens(tokenizer) -> list[str]:
    """The tokenizer's EOS plus every known end-of-turn token in its vocabulary, in that order."""
    vocab = tokenizer.get_vocab()
    found = [tokenizer.eos_token] if tokenizer.eos_token else []
    return list(dict.fromkeys(found + [token for token in END_OF_TURN if token in vocab]))


def template_for(chat_template: str | None) -> tuple[str, str] | None:
    """(name, Go template) for the chat format the Jinja template writes, or None when it is none we know."""
    for name, (marker, template) in TEMPLATES.items():
        if chat_template and marker in chat_template:
            return name, template
    return None


def check_system(system_prompt: str) -> None:
    """A system prompt the Modelfile can hold: its SYSTEM string is delimited by triple quotes."""
    if '"""' in system_prompt:
        raise UserError(
            'the system prompt (system.txt of the prompt set) contains """, which ends the Ollama Modelfile\'s SYSTEM '
            "string early; remove it, or pass --gguf none to write no GGUF and no Modelfile."
        )


def write_modelfile(
    run_dir: str | Path,
    gguf_name: str,
    system_prompt: str,
    stop_tokens: list[str],
    params: dict | None = None,
    template: str | None = None,
) -> Path:
    """<run_dir>/Modelfile for `ollama create <name> -f Modelfile`; FROM is relative to the Modelfile's folder."""
    check_system(system_prompt)
    if template and '"""' in template:
        raise UserError('the chat template contains """, which ends the Modelfile\'s TEMPLATE string early.')
    lines = [f"FROM ./{gguf_name}", ""]
    if template:
        lines += [f'TEMPLATE """{template}"""', ""]
    if system_prompt:
        lines += [f'SYSTEM """{system_prompt}"""', ""]
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    lines += [f"PARAMETER {key} {value}" for key, value in {**PARAMS, **(params or {})}.items()]
    path = Path(run_dir) / "Modelfile"
    files.write_atomic(path, "\n".join(lines) + "\n")
    return path


def parameters(path: str | Path) -> dict[str, str | list[str]]:
    """A Modelfile's PARAMETER lines as {name: value} (stop: every value, in order), as `ollama show` lists them."""
    params: dict = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("PARAMETER "):
            _, name, value = line.split(" ", 2)
            if name == "stop":
                params.setdefault("stop", []).append(value.strip('"'))
            else:
                params[name] = value
    return params


def gguf_name(path: str | Path) -> str | None:
    """The file a Modelfile's FROM line names, relative to its folder ("./model.q8_0.gguf" -> "model.q8_0.gguf")."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("FROM "):
            return line[5:].strip().removeprefix("./")
    return None
