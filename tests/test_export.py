"""GGUF export, run for real: a merged LoRA model -> llama.cpp's converter -> quantized GGUFs -> answers in llama.cpp.

One export of the embedded SmolLM2-135M (with a random LoRA merged in) is shared by the module (~30 s on 2 cores).
The converter comes from the cache, or from the llama-cpp-python sdist on the first run (needs the package index).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from titletune import converter, fidelity, llamacpp, ollama
from titletune import export as gguf_export
from titletune import reports as report_md
from titletune.base_models import embedded_hf_dir
from titletune.config import FIDELITY_TOKENS, cache_dir
from titletune.errors import UserError

pytestmark = pytest.mark.slow

SYSTEM = "You answer questions about products in one or two sentences."
QUESTION = "What is the book 'Dune' about?"
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
EXPECTED_FILES = {"model.f16.gguf", "model.q4_k_m.gguf", "model.q8_0.gguf", "Modelfile", "export.json"}


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """The embedded model with a freshly initialised LoRA (non-zero B) merged in, saved as a 16-bit HF folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = embedded_hf_dir()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.eos_token != "<|im_end|>":  # the chat turn ends with <|im_end|>; SmolLM2's config says eos id 2
        tokenizer.eos_token = "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
    model = get_peft_model(model, config)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would merge to exactly the base model
            torch.nn.init.normal_(param, std=0.02)
    model = model.merge_and_unload()
    assert (model.model.layers[0].self_attn.q_proj.weight - before).abs().max() > 1e-3
    out = tmp_path_factory.mktemp("merged")
    model.to(torch.bfloat16).save_pretrained(out)  # what the trainer ships: 16-bit safetensors
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(merged):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(merged)


def products(n: int) -> list[fidelity.Sample]:
    """n products of the embedded sample, as a run's rows would ask them."""
    from conftest import SAMPLE

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:n]]
    return [
        fidelity.Sample("test", [*MESSAGES[:1], {"role": "user", "content": f"What is '{r['title']}'?"}], r["content"])
        for r in rows
    ]


@pytest.fixture(scope="module")
def run(merged, tokenizer, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("run")
    options = gguf_export.Options(question=QUESTION, samples=products(4))
    report = gguf_export.export(run_dir, merged, ["q4_k_m", "q8_0"], SYSTEM, tokenizer, options)
    return run_dir, report


def test_exact_files_and_gguf_magic(run):
    run_dir, _ = run
    assert {p.name for p in run_dir.iterdir()} == EXPECTED_FILES  # no temporary files left behind either
    for name in EXPECTED_FILES:
        if name.endswith(".gguf"):
            assert (run_dir / name).read_bytes()[:4] == b"GGUF"


def test_export_json_matches_files(run):
    run_dir, report = run
    assert json.loads((run_dir / "export.json").read_text()) == report
    assert [f["type"] for f in report["files"]] == ["f16", "q4_k_m", "q8_0"]
    assert report["llama_cpp_python"] == converter.llama_cpp_version()
    assert Path(report["converter"]).is_file()
    for entry in report["files"]:
        path = run_dir / entry["name"]
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["seconds"] > 0 and entry["verify_seconds"] > 0
        assert entry["verify_answer"] and entry["verify_tokens"] > 0
    sizes = {entry["type"]: entry["bytes"] for entry in report["files"]}
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"]


def test_gguf_carries_chat_template_and_tokenizer(run, tokenizer):
    run_dir, _ = run
    metadata = gguf_export.read_metadata(run_dir / "model.q4_k_m.gguf")
    assert metadata["tokenizer.chat_template"] == tokenizer.chat_template
    assert (metadata["tokenizer.ggml.model"], metadata["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert int(metadata["tokenizer.ggml.eos_token_id"]) == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_q4_k_m_answers_in_llama_cpp(run):
    run_dir, _ = run
    llm = llamacpp.load(run_dir / "model.q4_k_m.gguf", threads=1)
    try:
        reply = llm.create_chat_completion(messages=MESSAGES, max_tokens=24, temperature=0.0)
    finally:
        llm.close()
    assert reply["choices"][0]["message"]["content"].strip()
    assert gguf_export.verify(run_dir / "model.q4_k_m.gguf", MESSAGES, max_tokens=8).strip()


def test_f16_gguf_agrees_with_merged_model(run, merged, tokenizer):
    """Greedy decoding of the same prompt: transformers on merged/ (bf16 weights, computed in fp32) against llama.cpp
    on the f16 GGUF (the same bf16 values, exactly representable). Their logits differ by rounding only, so the first
    token must agree; later tokens may legitimately drift after a near tie, so only the first three are compared."""
    from transformers import AutoModelForCausalLM

    run_dir, _ = run
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()

    llm = llamacpp.load(run_dir / "model.f16.gguf", threads=1)
    try:
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        cpp = []
        for token in llm.generate(ids, temp=0.0):
            cpp.append(token)
            if len(cpp) == 8:
                break
        chat = llm.create_chat_completion(messages=MESSAGES, max_tokens=8, temperature=0.0)
    finally:
        llm.close()
    assert cpp[0] == hf[0]
    assert cpp[:3] == hf[:3], (tokenizer.decode(cpp), tokenizer.decode(hf))
    # The chat API renders the GGUF's own template: the same prompt, so the same start of the answer.
    assert (
        chat["choices"][0]["message"]["content"].split()[0]
        == tokenizer.decode(hf, skip_special_tokens=True).split()[0]
    )


def test_modelfile(run):
    run_dir, report = run
    text = (run_dir / "Modelfile").read_text()
    from_line = text.splitlines()[0]
    assert from_line == "FROM ./model.q4_k_m.gguf" and (run_dir / from_line.split("./", 1)[1]).is_file()
    assert f'SYSTEM """{SYSTEM}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert ollama.parameters(run_dir / "Modelfile")["num_ctx"] == "2048"
    assert ollama.parameters(run_dir / "Modelfile")["temperature"] == "0"  # greedy, as the report decodes
    # Ollama's own ChatML template, written out because its auto-detection is a fuzzy match (see ollama.TEMPLATES).
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text
    assert report["modelfile"] == {
        "name": "Modelfile",
        "gguf": "model.q4_k_m.gguf",
        "template": "chatml",
        "stop": ["<|im_end|>"],
    }


def test_stop_tokens_and_templates(tokenizer):
    assert ollama.stop_tokens(tokenizer)[0] == tokenizer.eos_token
    assert "<|im_end|>" in ollama.stop_tokens(tokenizer)
    assert ollama.template_for(tokenizer.chat_template)[0] == "chatml"
    llama3 = "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] }}"
    assert ollama.template_for(llama3)[0] == "llama3"
    assert ollama.template_for("{{ message['content'] }}") is None


def test_parse_gguf_types():
    assert gguf_export.parse_gguf_types("q4_k_m,q8_0") == ["q4_k_m", "q8_0"]
    assert gguf_export.parse_gguf_types(" Q8_0, f16 ,q8_0") == ["q8_0", "f16"]
    assert gguf_export.parse_gguf_types("none") == [] and gguf_export.parse_gguf_types("") == []
    assert gguf_export.parse_gguf_types("bf16") == ["bf16"]
    with pytest.raises(UserError) as err:
        gguf_export.parse_gguf_types("q4_k_m,q3_zz")
    assert "q3_zz" in str(err.value)
    for valid in ("f16", "bf16", "q8_0", "q4_k_m"):
        assert valid in str(err.value)


def test_quantize_crash_leaves_no_file(run, monkeypatch, tmp_path):
    import llama_cpp

    run_dir, _ = run

    def dies_halfway(src, dst, params):
        Path(dst.decode()).write_bytes(b"GGUF" + b"\0" * 1000)  # what a killed quantizer leaves
        raise RuntimeError("killed")

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", dies_halfway)
    with pytest.raises(RuntimeError):
        converter.quantize(run_dir / "model.f16.gguf", tmp_path / "model.q8_0.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []

    def fails(src, dst, params):
        Path(dst.decode()).write_bytes(b"GGUF")
        return 1

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", fails)
    with pytest.raises(UserError, match="could not quantize"):
        converter.quantize(run_dir / "model.f16.gguf", tmp_path / "model.q8_0.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="valid: q8_0"):
        converter.quantize(run_dir / "model.f16.gguf", tmp_path / "model.q3_zz.gguf", "q3_zz")


def test_failed_conversion_leaves_no_file(run, merged, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((merged / "config.json").read_bytes())  # a config, but no weights
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match="failed"):
        converter.convert(bad, out / "model.f16.gguf", converter=Path(run[1]["converter"]))
    assert list(out.iterdir()) == []
    with pytest.raises(UserError, match="no config.json"):
        converter.convert(tmp_path / "missing", out / "model.f16.gguf")


def test_misread_tokenizer_is_an_error_not_a_crash(run, merged, tokenizer, tmp_path):
    """A tokenizer.json the converter takes for a Llama SPM vocabulary converts fine, then aborts llama.cpp on the
    first tokenize. Export must report it, in this process, and leave no GGUF under a final name."""
    broken = tmp_path / "merged"
    broken.mkdir()
    for item in merged.iterdir():
        (broken / item.name).symlink_to(item)
    (broken / "tokenizer.json").unlink()
    data = json.loads((merged / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["byte_fallback"] = True
    data["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}
    (broken / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "run"
    with pytest.raises(UserError, match="llama.cpp|tokenizes"):
        gguf_export.export(out, broken, ["q8_0"], SYSTEM, tokenizer, gguf_export.Options(verify=False))
    assert list(out.iterdir()) == []


def test_find_converter_explicit_dir_and_env(tmp_path, monkeypatch):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for folder in (mine, theirs):
        folder.mkdir()
        (folder / "convert_hf_to_gguf.py").write_text("")
    monkeypatch.setenv("LLAMA_CPP_DIR", str(theirs))
    assert converter.find_converter(str(mine)) == mine / "convert_hf_to_gguf.py"
    assert converter.find_converter() == theirs / "convert_hf_to_gguf.py"
    with pytest.raises(UserError, match="--llama-cpp-dir"):
        converter.find_converter(str(tmp_path))


def test_cached_converter_needs_no_network(run, monkeypatch):
    real_run = subprocess.run

    def no_download(cmd, *args, **kwargs):
        assert "download" not in cmd, "find_converter went to the network although the converter is cached"
        return real_run(cmd, *args, **kwargs)

    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setattr(subprocess, "run", no_download)
    expected = cache_dir() / f"llama.cpp-{converter.llama_cpp_version()}" / "convert_hf_to_gguf.py"
    assert converter.find_converter() == expected
    assert (expected.parent / "gguf-py" / "gguf" / "lazy.py").is_file()
    assert (expected.parent / "conversion" / "llama.py").is_file()


def test_an_export_never_downloads_the_converter(tmp_path, monkeypatch):
    """Without a cached converter an export says how to get one; it runs no pip (set-up fetched it)."""
    real_run = subprocess.run

    def no_pip(cmd, *args, **kwargs):
        assert "pip" not in cmd, "an export ran pip"
        return real_run(cmd, *args, **kwargs)

    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("TITLETUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", no_pip)
    with pytest.raises(UserError) as err:
        converter.find_converter()
    assert "make setup" in str(err.value) and "--llama-cpp-dir" in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_fetch_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("TITLETUNE_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # a real pip run that cannot reach any index
    with pytest.raises(UserError) as err:
        converter.fetch_converter()
    assert "--llama-cpp-dir" in str(err.value) and "LLAMA_CPP_DIR" in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == []  # no half-made cache entry


def test_fidelity_numbers_for_every_file(run):
    """Each file against merged/ on the same 4 products: the f16 file nearly identical, the quants further away in
    the order of their size, every number present and in range."""
    _, report = run
    numbers = {entry["type"]: entry["fidelity"] for entry in report["files"]}
    assert set(numbers) == {"f16", "q4_k_m", "q8_0"}
    for f in numbers.values():
        assert f["prompts"] == 4 and f["max_tokens"] == FIDELITY_TOKENS
        assert 0 <= f["identical"] <= 1 and 0 <= f["agreeing_prefix"] <= f["max_tokens"]
        assert f["perplexity"] > 1 and f["perplexity_merged"] > 1 and f["tokens_per_second"] > 0
        assert 0 <= f["rougeL"] <= 1 and len(f["answers"]) == 4 and all(f["answers"])
        assert f["kl_divergence"] >= -1e-4 and f["kl_divergence_max"] >= f["kl_divergence"]
    f16 = numbers["f16"]
    assert f16["kl_divergence"] < fidelity.F16_MAX_KL and f16["identical"] >= fidelity.F16_MIN_IDENTICAL
    assert f16["perplexity"] == pytest.approx(f16["perplexity_merged"], rel=0.02)
    assert f16["kl_divergence"] < numbers["q8_0"]["kl_divergence"] < numbers["q4_k_m"]["kl_divergence"]
    assert report["fidelity_merged"]["tokens_per_second"] > 0 and report["fidelity_merged"]["check_seconds"] > 0
    table = "\n".join(report_md.fidelity_table(report["files"], report["fidelity_merged"]))
    for name in ("model.f16.gguf", "model.q4_k_m.gguf", "model.q8_0.gguf"):
        assert f"| {name} | " in table


@pytest.fixture(scope="module")
def editing_converter(tmp_path_factory, run):
    """A llama.cpp folder whose convert_hf_to_gguf.py runs the real converter, then rewrites the GGUF's metadata with
    the converter's own gguf-py (gguf_new_metadata.py) using the arguments in $EDIT_GGUF (a JSON list)."""
    real = Path(run[1]["converter"])
    folder = tmp_path_factory.mktemp("llama.cpp")
    (folder / "gguf-py").symlink_to(real.parent / "gguf-py")
    (folder / converter.CONVERTER).write_text(
        f"""import json, os, subprocess, sys
args = sys.argv[1:]
out = args[args.index("--outfile") + 1]
args[args.index("--outfile") + 1] = out + ".unedited"
subprocess.run([sys.executable, {str(real)!r}, *args], check=True)
script = {str(real.parent / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py")!r}
edit = json.loads(os.environ["EDIT_GGUF"])
subprocess.run([sys.executable, script, out + ".unedited", out, "--force", *edit], check=True)
os.remove(out + ".unedited")
"""
    )
    return folder


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            ["--chat-template", "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"],
            r"renders the chat differently from the tokenizer's chat template \(the GGUF's tokenizer.chat_template "
            r"is not the tokenizer's",
        ),
        (["--special-token-by-id", "eos", "0"], r"would not stop where the model was trained to: answers end with "),
        # llama3, qwen2 and deepseek-llm split this text as smollm does up to BPE's merges; falcon's differs on titles.
        (["--pre-tokenizer", "falcon"], r"tokenizes text differently .*tokenizer.ggml.pre='falcon'"),
    ],
    ids=["chat-template", "eos-id", "pre-tokenizer"],
)
def test_a_broken_gguf_fails_the_export_with_its_cause(
    edit, message, editing_converter, run, merged, tokenizer, tmp_path, monkeypatch
):
    """A re-export whose files fail the check publishes none of them: the previous export's GGUFs (the very names
    the failed one wrote), Modelfile and export.json stay, untouched, and nothing else is left in the folder."""
    monkeypatch.setenv("EDIT_GGUF", json.dumps(edit))
    out = tmp_path / "run"
    out.mkdir()
    previous = ["model.f16.gguf", "model.q4_k_m.gguf", "Modelfile", "export.json"]
    for name in previous:
        (out / name).hardlink_to(run[0] / name)  # the same inode: a file replaced by the export would not be
    options = gguf_export.Options(llama_cpp_dir=str(editing_converter), samples=products(2))
    with pytest.raises(UserError, match=message):
        gguf_export.export(out, merged, ["q4_k_m"], SYSTEM, tokenizer, options)
    assert sorted(p.name for p in out.iterdir()) == sorted(previous)  # no staging folder, no temp file
    assert all((out / name).samefile(run[0] / name) for name in previous)


def test_llama_cpp_crashing_keeps_the_files_unpublished_and_says_so(run, merged, tokenizer, tmp_path, monkeypatch):
    """A llama.cpp child killed by SIGILL (what its AMX path does on some Xeons; here a sitecustomize on the child's
    path sends it) fails the export as llama.cpp's crash, not the file's: the files written so far are kept in
    gguf-unchecked/, and the previous export stays published, untouched."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal\n"
        "if b'titletune.llamacpp_child' in open('/proc/self/cmdline', 'rb').read():\n"
        "    os.kill(os.getpid(), signal.SIGILL)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(hook))
    out = tmp_path / "run"
    out.mkdir()
    previous = ["model.f16.gguf", "model.q4_k_m.gguf", "Modelfile", "export.json"]
    for name in previous:
        (out / name).hardlink_to(run[0] / name)
    with pytest.raises(fidelity.EngineCrash) as err:
        gguf_export.export(out, merged, ["q4_k_m"], SYSTEM, tokenizer, gguf_export.Options(samples=products(2)))
    message = str(err.value)
    assert "SIGILL" in message and "illegal instruction" in message and "--export-only" in message
    assert sorted(p.name for p in out.iterdir()) == sorted([*previous, gguf_export.UNCHECKED])
    assert all((out / name).samefile(run[0] / name) for name in previous)
    kept = out / gguf_export.UNCHECKED / "model.f16.gguf"
    assert kept.read_bytes()[:4] == b"GGUF"


def test_both_engines_give_the_same_greedy_answer_on_the_f16_file(trained_run):
    """infer.py on merged/ in transformers and on model.f16.gguf in llama.cpp: one question, greedy, the same answer.
    float32 in transformers: in bf16 (the CPU default after a bf16 run) the answers part after about 6 tokens. Even in
    float32 they are not equal forever: llama.cpp's f16 matmuls round the activations to f16, and on this question a
    near tie flipped token 15 ("great" / "mix"). 12 tokens is the answer length the two engines must share."""
    from conftest import run_cli

    title = json.loads((trained_run / "data" / "train.jsonl").read_text().splitlines()[0])["prompt"][-1]["content"]
    common = (title, "--run", str(trained_run), "--only", "tuned", "--max-new-tokens", "12", "--json")
    hf = json.loads(run_cli("infer.py", *common, "--use-merged", "--dtype", "float32").stdout)
    f16 = str(trained_run / "model.f16.gguf")
    cpp = json.loads(run_cli("infer.py", *common, "--engine", "llamacpp", "--gguf", f16).stdout)
    assert (hf["engine"], cpp["engine"]) == ("transformers", "llamacpp")
    assert hf["tuned"] and cpp["tuned"] == hf["tuned"]


def test_export_only_recomputes_the_fidelity_table(trained_run, tmp_path):
    """train.py --export-only on a finished run: new files, new numbers in export.json and report.md's table."""
    import shutil

    from conftest import run_cli

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("*.gguf", "export.json", "README.md"))
    run_cli("train.py", "--export-only", "--run", str(run_dir), "--gguf", "q8_0", "--fidelity-samples", "1")
    exported = json.loads((run_dir / "export.json").read_text())
    assert [(f["type"], f["fidelity"]["prompts"]) for f in exported["files"]] == [("f16", 2), ("q8_0", 2)]
    report = (run_dir / "report.md").read_text()
    assert "## Export fidelity" in report and "| model.q8_0.gguf | " in report and "| model.f16.gguf | " in report
