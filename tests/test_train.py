"""Training for real on CPU: the embedded SmolLM2-135M-Instruct, through the real train.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SAMPLE, TINY, losses, run_cli
from safetensors.torch import load_file

from titletune import base_models


def test_run_folder_has_exactly_the_promised_files(trained_run):
    top = {p.name for p in trained_run.iterdir()}
    expected = {
        "run_config.yaml",
        "prompts",
        "data",
        "adapter",
        "merged",
        "train_log.jsonl",
        "loss.png",
        "model.f16.gguf",
        "model.q4_k_m.gguf",
        "Modelfile",
        "export.json",
        "report.json",
        "report.md",
        "report.png",
        "rag",  # the evaluation's search index over the training products
        "capacity.json",  # the capacity line's figures (titletune/capacity.py)
        "README.md",  # the model card (tests/test_card.py)
    }
    checkpoints = {name for name in top if name.startswith("checkpoint-")}
    assert checkpoints == {"checkpoint-6", "checkpoint-12"}
    assert top - checkpoints == expected
    assert {p.name for p in (trained_run / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert {p.name for p in (trained_run / "prompts").iterdir()} == {
        "system.txt",
        "user.txt",
        "heldout.txt",
        "assistant.txt",
        "rag.txt",
        "rag_entry.txt",
    }
    assert (trained_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_falls(trained_run):
    curve = losses(trained_run)
    assert sorted(curve) == [2, 4, 6, 8, 10, 12]
    first, last = curve[2], curve[12]
    assert last < 0.8 * first, curve


def test_lora_weights_changed_and_base_weights_did_not(trained_run):
    import yaml

    config = yaml.safe_load((trained_run / "run_config.yaml").read_text())
    adapter = load_file(trained_run / "adapter" / "adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert len(lora_b) == 30 * 7  # every projection of all 30 blocks
    # peft initialises lora_B to zero: training is the only thing that moves it.
    assert all(v.abs().max() > 0 for v in lora_b.values())
    assert not any("lora" not in k for k in adapter), "the adapter must hold LoRA weights only"

    base_dir = base_models.resolve(config["base_model"])
    assert config["base_model"] == "embedded"  # portable: resolved on whichever machine loads the run
    base = load_file(Path(base_dir) / "model.safetensors")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), trained_run / "adapter")
    for name, param in model.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        key = name.replace("base_layer.", "")
        assert torch.equal(param.detach(), base[key]), f"{key} changed"


def test_adapter_answers_differently_from_base(trained_run):
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = yaml.safe_load((trained_run / "run_config.yaml").read_text())
    tokenizer = AutoTokenizer.from_pretrained(trained_run / "adapter")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_models.resolve(config["base_model"])), trained_run / "adapter"
    ).eval()
    row = json.loads((trained_run / "data" / "train.jsonl").read_text().splitlines()[0])
    ids = tokenizer.apply_chat_template(
        row["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        tuned = model.generate(**ids, max_new_tokens=24, do_sample=False)
        with model.disable_adapter():
            base = model.generate(**ids, max_new_tokens=24, do_sample=False)
    assert not torch.equal(tuned, base)


def test_existing_output_dir_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = run_cli("train.py", "--output-dir", str(tmp_path), "--prepare-only", check=False)
    assert result.returncode == 2
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr
    # --overwrite never deletes a folder that is not a titletune run
    result = run_cli("train.py", "--output-dir", str(tmp_path), "--prepare-only", "--overwrite", check=False)
    assert result.returncode == 2 and (tmp_path / "keep.txt").is_file()


def test_full_fine_tuning_is_refused_with_the_fix_not_silently_trained_as_lora(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train.py", "--output-dir", str(run_dir), "--use-peft", "false", "--prepare-only", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--use-peft false" in result.stderr and "--lora-r" in result.stderr
    assert not run_dir.exists()  # refused before anything was written


def test_overwrite_replaces_a_previous_run(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("train.py", "--data", str(SAMPLE), "--output-dir", str(run_dir), "--prepare-only")
    (run_dir / "stale.txt").write_text("old")
    run_cli("train.py", "--data", str(SAMPLE), "--output-dir", str(run_dir), "--prepare-only", "--overwrite")
    assert not (run_dir / "stale.txt").exists() and (run_dir / "data" / "train.jsonl").is_file()


def test_resume_without_checkpoint_fails_with_the_fix(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("train.py", "--data", str(SAMPLE), "--output-dir", str(run_dir), "--prepare-only")
    result = run_cli("train.py", "--output-dir", str(run_dir), "--resume", "--max-steps", "2", check=False)
    assert result.returncode == 2 and "no checkpoint" in result.stderr and "Traceback" not in result.stderr


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "train.py",
            "--data",
            str(SAMPLE),
            "--output-dir",
            str(run_dir),
            *TINY,
            *extra,
            "--gguf",
            "none",
            "--no-merge",
            "--eval-samples",
            "0",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"train.py ended ({proc.returncode}) before {path.name} appeared:\n{proc.stdout.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.2)


SHORT = ["--max-steps", "8", "--save-steps", "2", "--max-samples", "24"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hf", "unsloth"])  # unsloth: its own CPU backend, in a subprocess like all runs
def test_kill_9_then_resume_ends_at_the_planned_step_with_the_same_data_order(tmp_path, backend):
    straight = tmp_path / "straight"
    run_cli(
        "train.py",
        "--backend",
        backend,
        "--data",
        str(SAMPLE),
        "--output-dir",
        str(straight),
        *TINY,
        *SHORT,
        "--gguf",
        "none",
        "--no-merge",
        "--eval-samples",
        "0",
    )

    broken = tmp_path / "broken"
    proc = _start(broken, "--backend", backend, *SHORT)
    _wait_for(broken / "checkpoint-4" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (broken / "adapter").exists()

    run_cli(
        "train.py",
        "--output-dir",
        str(broken),
        "--resume",
        "--backend",
        backend,
        *TINY,
        *SHORT,
        "--gguf",
        "none",
        "--no-merge",
        "--eval-samples",
        "0",
    )
    state = json.loads((broken / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    assert (broken / "adapter" / "adapter_model.safetensors").is_file()
    # Same data in the same order: the resumed steps see the same batches as the uninterrupted run.
    resumed, reference = losses(broken), losses(straight)
    for step in (6, 8):
        assert resumed[step] == pytest.approx(reference[step], rel=2e-2), (resumed, reference)


@pytest.mark.slow
def test_ctrl_c_saves_the_adapter_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "--max-steps", "400", "--save-steps", "1000", "--logging-steps", "1")
    _wait_for(run_dir / "train_log.jsonl", proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out
    assert "--resume" in out
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert any(p.name.startswith("checkpoint-") for p in run_dir.iterdir())


def test_help_documents_every_flag():
    out = run_cli("train.py", "--help").stdout
    for flag in (
        "--max_samples",
        "--max-samples",
        "--data",
        "--title_field",
        "--content_field",
        "--backend",
        "--resume",
        "--overwrite",
        "--prepare_only",
        "--export_only",
        "--gguf",
        "--llama_cpp_dir",
        "--model_name_or_path",
        "--load_in_4bit",
        "--lora_r",
        "--learning_rate",
        "--max_length",
        "--config",
        "--trust_remote_code",
        "--eval_samples",
        "--fidelity_samples",
        "--fidelity_tokens",
    ):
        assert flag in out, flag


def test_4bit_gradients_are_unchanged_by_an_eval_forward():
    """bitsandbytes on AVX512-BF16 CPUs repacks 4-bit weights on the first no-grad forward, after which gradients
    through the frozen base are silently wrong. hf.load turns that path off; this guards it."""
    from trl import ModelConfig

    from titletune import base_models
    from titletune.backends import hf

    args = ModelConfig(
        load_in_4bit=True, lora_r=8, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"]
    )

    class Training:
        gradient_checkpointing = False

    model, tokenizer = hf.load(base_models.resolve("embedded"), args)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
    model = hf.add_lora(model, args, Training())
    batch = tokenizer(["The Girls Ballet Tutu is a three layer tutu."], return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()

    def lora_grads() -> dict[str, torch.Tensor]:
        model.train()
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "lora_A" in n}

    before = lora_grads()
    model.eval()
    with torch.no_grad():
        model(**batch)
    after = lora_grads()
    assert before.keys() == after.keys() and before
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-3, atol=1e-6, msg=name)
