"""The CUDA path, for real: Unsloth 4-bit QLoRA and the hf backend's bitsandbytes QLoRA. Skipped without a GPU.

They need the model hub (the presets' 4-bit Llama) or TITLETUNE_GPU_MODEL pointing at a local 4-bit model folder.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from conftest import SAMPLE, run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA"),
]
MODEL = os.environ.get("TITLETUNE_GPU_MODEL", "unsloth/Llama-3.2-1B-Instruct-bnb-4bit")
SHORT = [
    "--data",
    str(SAMPLE),
    "--max-samples",
    "64",
    "--max-steps",
    "20",
    "--learning-rate",
    "5e-4",
    "--logging-steps",
    "5",
    "--save-steps",
    "20",
    "--eval-samples",
    "4",
    "--gguf",
    "q4_k_m",
    "--model-name-or-path",
    MODEL,
    "--load-in-4bit",
]


def _check(run_dir):
    losses = [
        json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    assert losses[-1] < losses[0]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "merged" / "config.json").is_file()
    assert (run_dir / "model.q4_k_m.gguf").read_bytes()[:4] == b"GGUF"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["seen"]["tuned"]["rougeL"]["mean"] > report["seen"]["base"]["rougeL"]["mean"]


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="unsloth is not installed")
def test_unsloth_qlora_trains_merges_and_exports(tmp_path):
    run_dir = tmp_path / "unsloth"
    result = run_cli("train.py", "--backend", "unsloth", "--output-dir", str(run_dir), *SHORT, timeout=3600)
    assert "backend unsloth" in result.stderr + result.stdout
    _check(run_dir)


def test_hf_qlora_on_cuda_trains_merges_and_exports(tmp_path):
    run_dir = tmp_path / "hf"
    run_cli("train.py", "--backend", "hf", "--output-dir", str(run_dir), *SHORT, timeout=3600)
    _check(run_dir)
