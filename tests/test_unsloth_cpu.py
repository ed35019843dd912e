"""The Unsloth backend for real on CPU: Unsloth 2026.10.9's own CPU backend (unsloth_zoo.cpu) under train.py.

Every run is a subprocess through the real CLI, because `import unsloth` patches transformers, trl and peft for the
whole process. One run goes train -> adapter -> merge (fp16) -> GGUF q4_k_m + f16 (each verified) -> Modelfile ->
evaluation report, and infer.py answers from it. These tests run in CI: unsloth is installed on every machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, SAMPLE, TINY, losses, run_cli
from safetensors.torch import load_file

from titletune import base_models

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA, tests/test_gpu.py runs the unsloth backend"),
]


@pytest.fixture(scope="module")
def unsloth_run(tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("unsloth") / "run"
    result = run_cli(
        "train.py",
        "--backend",
        "unsloth",
        "--data",
        str(SAMPLE),
        "--output-dir",
        str(run_dir),
        *TINY,
        "--gguf",
        "q4_k_m,f16",  # the Modelfile ships the first type
        "--eval-samples",
        "2",
    )
    return run_dir, result.stdout + result.stderr


def test_unsloth_itself_trained_on_cpu(unsloth_run):
    run_dir, log = unsloth_run
    config = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    assert config["backend"] == "unsloth" and config["script"]["backend"] == "unsloth"
    # Printed by unsloth's CPU init and by unsloth_zoo.cpu's loader: the model came through FastCPUModel.
    assert "no GPU found, training on CPU" in log
    assert "Unsloth (CPU): LlamaForCausalLM" in log and "chunked CE = True" in log


def test_loss_falls(unsloth_run):
    curve = losses(unsloth_run[0])
    assert sorted(curve) == [2, 4, 6, 8, 10, 12]
    assert curve[12] < 0.8 * curve[2], curve


def test_lora_weights_changed_and_merge_is_base_plus_delta(unsloth_run):
    run_dir, _ = unsloth_run
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert len(lora_b) == 30 * 7
    assert all(v.abs().max() > 0 for v in lora_b.values())  # peft starts B at zero
    assert not any("lora" not in k for k in adapter)

    # merged/ is what the GGUF is made from: 16-bit, in the dtype the base trained in (bf16 on a CPU with native
    # bf16, else the fp32 base written as float16), and base + (alpha/r) * B @ A for a projection, to its rounding.
    bf16 = bool(yaml.safe_load((run_dir / "run_config.yaml").read_text())["training"]["bf16"])
    dtype, tol = (torch.bfloat16, 1e-2) if bf16 else (torch.float16, 2e-3)
    merged_config = json.loads((run_dir / "merged" / "config.json").read_text())
    assert merged_config["dtype"] == str(dtype).removeprefix("torch.")
    merged = load_file(run_dir / "merged" / "model.safetensors")
    base = load_file(Path(base_models.resolve("embedded")) / "model.safetensors")
    key = "model.layers.3.self_attn.q_proj.weight"
    prefix = "base_model.model.model.layers.3.self_attn.q_proj"
    a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
    scale = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    expected = base[key].float() + scale["lora_alpha"] / scale["r"] * (b.float() @ a.float())
    assert merged[key].dtype == dtype
    assert not torch.equal(merged[key].float(), base[key].float())
    torch.testing.assert_close(merged[key].float(), expected, rtol=tol, atol=tol)


def test_merged_model_loads_back_and_answers(unsloth_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = unsloth_run
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32).eval()
    row = json.loads((run_dir / "data" / "train.jsonl").read_text().splitlines()[0])
    ids = tokenizer.apply_chat_template(
        row["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_ggufs_verified_and_answer_in_llama_cpp(unsloth_run):
    from titletune import llamacpp

    run_dir, _ = unsloth_run
    report = json.loads((run_dir / "export.json").read_text())
    files = {entry["name"]: entry for entry in report["files"]}
    assert set(files) == {"model.f16.gguf", "model.q4_k_m.gguf"}
    for name, entry in files.items():
        assert (run_dir / name).read_bytes()[:4] == b"GGUF"
        assert entry["verify_answer"].strip() and entry["verify_tokens"] > 0  # loaded and answered in llama.cpp
    llm = llamacpp.load(run_dir / "model.q4_k_m.gguf", n_ctx=512, threads=1)
    try:
        reply = llm.create_chat_completion(
            messages=[{"role": "user", "content": "What is 'Girls Ballet Tutu Neon Pink'?"}],
            max_tokens=16,
            temperature=0,
        )
    finally:
        llm.close()
    assert reply["choices"][0]["message"]["content"].strip()
    modelfile = (run_dir / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.q4_k_m.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_report_written(unsloth_run):
    run_dir, _ = unsloth_run
    report = json.loads((run_dir / "report.json").read_text())
    # --eval-samples 2: two trained products, and up to two of the run's test split (2 of the 40 products here)
    assert report["counts"]["seen"] == 2 and 1 <= report["counts"]["heldout"] <= 2
    for population in ("seen", "heldout"):
        assert {"base", "tuned"} <= set(report[population])
        assert 0 <= report[population]["tuned"]["rougeL"]["mean"] <= 1
    assert (run_dir / "report.md").read_text().strip()


def test_infer_answers_base_and_tuned_from_the_unsloth_run(unsloth_run):
    run_dir, _ = unsloth_run
    out = run_cli(
        "infer.py", "--run", str(run_dir), "--json", "--max-new-tokens", "16", "What is 'Girls Ballet Tutu Neon Pink'?"
    ).stdout
    answer = json.loads(out.strip().splitlines()[-1])
    assert answer["base"].strip() and answer["tuned"].strip()
    assert answer["base"] != answer["tuned"]


def test_4bit_base_on_cpu_is_refused_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "train.py", "--backend", "unsloth", "--load-in-4bit", "true", "--output-dir", str(run_dir), check=False
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--load-in-4bit false" in result.stderr and "--backend hf" in result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_unsloth_is_imported_once_across_parse_and_main():
    """Regression: train.parse() imported unsloth, then main() called load_backend again, which saw trl imported
    and raised "unsloth must be imported before trl" on every device, before training."""
    code = (
        "import sys, train\n"
        "from titletune import backends\n"
        "args = train.parse(['--backend', 'unsloth', '--prepare-only'])\n"
        "assert 'trl' in sys.modules and 'unsloth' in sys.modules\n"
        "module = backends.load_backend(args.script.backend)\n"
        "print(module.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "titletune.backends.unsloth"


def test_import_order_guard_still_catches_a_late_first_import():
    code = "import trl\nfrom titletune import backends\nbackends.load_backend('unsloth')\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "unsloth must be imported before trl" in result.stderr


def test_auto_follows_the_measured_table(tmp_path):
    from titletune import backends, config, machine

    here = machine.device()
    assert here in ("cpu", "cpu_bf16")
    assert backends.choose("auto") == backends.AUTO[here]
    assert backends.choose("auto", load_in_4bit=True) == "hf"  # Unsloth cannot merge a 4-bit base on CPU
    # The setting is read from either spelling, or from the --config preset when no flag gives it.
    preset = tmp_path / "p.yaml"
    preset.write_text("backend: hf\nload_in_4bit: true\n")
    assert config.asked(["--load-in-4bit", "false", "--config", str(preset)]).value("load_in_4bit", "x") == "false"
    assert config.asked(["--load_in_4bit=false"]).value("load_in_4bit", "x") == "false"
    assert config.asked(["--config", str(preset)]).value("load_in_4bit", "x") == "True"
    assert config.asked(["--config", str(preset)]).value("backend", "auto") == "hf"
    assert config.asked([]).value("backend", "auto") == "auto"


def test_default_run_takes_the_auto_backend_of_this_machine(tmp_path):
    from titletune import backends, machine

    run_dir = tmp_path / "run"
    run_cli("train.py", "--output-dir", str(run_dir), "--prepare-only")
    config = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    assert config["backend"] == backends.AUTO[machine.device()]
