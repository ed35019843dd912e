"""Scaling out: two real processes on CPU (DDP over gloo), the data-prep cache, on-disk datasets, the presets, and
which multi-GPU setups each backend accepts."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, SAMPLE, run_cli
from safetensors.torch import load_file

from titletune import backends, prepare, prompts, runs
from titletune.config import DataArguments
from titletune.errors import UserError

DDP = ROOT / "configs" / "accelerate" / "ddp.yaml"
FSDP = ROOT / "configs" / "accelerate" / "fsdp_qlora.yaml"
PRESET_70B = ROOT / "configs" / "llama3_1_70b_fsdp_qlora.yaml"
QA = ROOT / "prompts" / "qa"


def launch_env() -> dict[str, str]:
    # Two processes on two cores: one thread each, or they fight over the cores and the run crawls.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_two_processes_train_one_run(tmp_path):
    """accelerate launch with the DDP preset, two CPU processes (no GPU: accelerate falls back to gloo)."""
    run_dir = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(DDP),
        "--num_processes",
        "2",
        "train.py",
        "--data",
        str(SAMPLE),
        "--output-dir",
        str(run_dir),
        "--max-samples",
        "24",
        "--max-steps",
        "4",
        "--per-device-train-batch-size",
        "2",
        "--learning-rate",
        "1e-3",
        "--max-length",
        "128",
        "--max-content-chars",
        "240",
        "--logging-steps",
        "1",
        "--save-steps",
        "2",
        "--warmup-steps",
        "0",
        "--gguf",
        "none",
        "--eval-samples",
        "0",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=launch_env())
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]

    # One complete run folder, and nothing else in it.
    assert {p.name for p in run_dir.iterdir()} == {
        "run_config.yaml",
        "prompts",
        "data",
        "adapter",
        "merged",
        "train_log.jsonl",
        "loss.png",
        "README.md",
        "capacity.json",  # written once, by the main process
        "checkpoint-2",
        "checkpoint-4",
    }
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained (lora_B starts at zero)
    assert (run_dir / "merged" / "model.safetensors").is_file()

    # Both ranks took part: each logs its own copy of the batch line, each saves its RNG state in every checkpoint,
    # and the sampler gave each rank half the data, so 4 steps of 2 x 2 rows cover 4 / ceil(rows / 4) of an epoch,
    # where an epoch is --passes rows per train product.
    assert out.count("batch 2 per device x 1 accumulation x 2 processes = 4 per step") == 2, out[-6000:]
    for step in (2, 4):
        names = {p.name for p in (run_dir / f"checkpoint-{step}").iterdir()}
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= names and "rng_state.pth" not in names
    n_train = json.loads((run_dir / "data" / "stats.json").read_text())["kept"]["train"]
    passes = yaml.safe_load((run_dir / "run_config.yaml").read_text())["data"]["passes"]
    state = json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(4 / math.ceil(n_train * passes / 4))

    # Nothing done or written twice: one run folder, one data prep, one merge, one log record per step.
    for line in (
        "titletune: run folder ",
        "titletune.prepare: data prep: ",
        "titletune: merged model in ",
        "titletune: done: ",
    ):
        assert out.count(line) == 1, f"{line!r} logged {out.count(line)} times"
    records = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


def test_auto_output_dir_is_rank_zeros_on_every_rank(tmp_path):
    """Each rank reads its own clock; rank 1 a second later. Both must still name the same run folder."""
    script = tmp_path / "ranks.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time
        import torch.distributed as dist
        sys.path.insert(0, {str(ROOT)!r})
        from titletune import runs
        dist.init_process_group("gloo")
        time.sleep(1.2 * dist.get_rank())  # more than a second apart: the timestamps differ
        # each rank writes its own file: torchrun pipes both ranks' stdout into one, where lines can interleave
        with open({str(tmp_path)!r} + f"/rank{{dist.get_rank()}}.txt", "w") as f:
            f.write(str(runs.resolve_dir("auto")))
        dist.destroy_process_group()
    """)
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=launch_env())
    assert result.returncode == 0, result.stderr[-3000:]
    found = {rank: (tmp_path / f"rank{rank}.txt").read_text() for rank in ("0", "1")}
    assert found["0"] == found["1"]
    assert Path(found["0"]).parent == runs.OUTPUTS
    assert not Path(found["0"]).exists()  # resolving names the folder; it does not make it


def test_data_prep_is_cached_by_input_settings_and_prompts(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="titletune.prepare")
    cache = tmp_path / "cache"
    source = tmp_path / "trn.json"
    source.write_bytes(SAMPLE.read_bytes())
    qa = prompts.load(QA)
    args = DataArguments(data=str(source), max_samples="30")

    first = prepare.prepare_cached(args, 7, tmp_path / "run1", qa, cache_root=cache)
    assert "data prep: cached as" in caplog.text
    caplog.clear()
    second = prepare.prepare_cached(args, 7, tmp_path / "run2", qa, cache_root=cache)
    assert "data prep: reused cache" in caplog.text and "data: read" not in caplog.text
    assert first == second
    entries = list(cache.iterdir())
    assert len(entries) == 1 and {p.name for p in entries[0].iterdir()} == set(prepare.CACHE_FILES)
    for name in prepare.CACHE_FILES:  # the same bytes in both runs, as prepare() itself writes them
        assert (tmp_path / "run1" / "data" / name).read_bytes() == (tmp_path / "run2" / "data" / name).read_bytes()
    prepare.prepare(args, 7, tmp_path / "plain", qa)
    for split in prepare.SPLITS:
        assert runs.read_split(tmp_path / "run2", split) == runs.read_split(tmp_path / "plain", split)

    # Anything the output depends on gives a new key: seed, a data argument, the prompt text, the input file.
    key = prepare.cache_key(args, 7, qa)
    assert prepare.cache_key(args, 8, qa) != key
    assert prepare.cache_key(DataArguments(data=str(source), max_samples="31"), 7, qa) != key
    other_prompts = tmp_path / "prompts"
    other_prompts.mkdir()
    for name in prompts.FILES:
        (other_prompts / name).write_text((QA / name).read_text())
    assert prepare.cache_key(args, 7, prompts.load(other_prompts)) == key  # the texts count, not where they live
    (other_prompts / "system.txt").write_text("You answer in one sentence.")
    assert prepare.cache_key(args, 7, prompts.load(other_prompts)) != key
    with source.open("ab") as f:
        f.write(b'{"uid": "new", "title": "A New Product", "content": "A description long enough to keep."}\n')
    assert prepare.cache_key(args, 7, qa) != key


def test_data_cache_keeps_the_most_recent_entries_and_runs_keep_their_files(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "CACHE_KEEP", 2)
    cache, qa = tmp_path / "cache", prompts.load(QA)
    args = DataArguments(data=str(SAMPLE), max_samples="20")
    for seed in (1, 2, 3):
        prepare.prepare_cached(args, seed, tmp_path / f"run{seed}", qa, cache_root=cache)
    assert {p.name for p in cache.iterdir()} == {prepare.cache_key(args, s, qa) for s in (2, 3)}
    assert len(runs.read_split(tmp_path / "run1", "train")) > 0  # a hard link outlives the evicted entry


def test_datasets_are_memory_mapped_and_hold_the_chat_columns_only(tmp_path):
    from titletune import trainset

    run_dir = tmp_path / "run"
    prepare.prepare(DataArguments(data=str(SAMPLE), max_samples="30"), 7, run_dir, prompts.load(QA))
    train_ds, _val_ds = trainset.load_datasets(run_dir)
    assert train_ds.column_names == ["prompt", "completion"]
    assert len(train_ds) == len(runs.read_split(run_dir, "train"))
    assert train_ds[0]["prompt"] == runs.read_split(run_dir, "train")[0]["prompt"]
    assert train_ds.cache_files and all(
        f["filename"].startswith(str(run_dir / "data" / "cache")) for f in train_ds.cache_files
    )
    (run_dir / "data" / "val.jsonl").write_bytes(b"")
    assert trainset.load_datasets(run_dir)[1] is None


def test_unsloth_refuses_sharded_launches_and_points_to_hf(monkeypatch):
    backends.check_distributed("unsloth", 1, None)
    backends.check_distributed("unsloth", 4, None)  # DDP: unsloth pins each rank to its own GPU
    backends.check_distributed("hf", 2, "FSDP")
    for sharding in ("FSDP", "DeepSpeed"):
        with pytest.raises(UserError, match="--backend hf") as e:
            backends.check_distributed("unsloth", 2, sharding)
        assert sharding in str(e.value)

    assert backends.launch({}) == (1, None)
    assert backends.launch({"WORLD_SIZE": "2"}) == (2, None)
    assert backends.launch({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}) == (2, "FSDP")
    assert backends.launch({"WORLD_SIZE": "8", "ACCELERATE_USE_DEEPSPEED": "true"}) == (8, "DeepSpeed")

    # What `accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml` exports to every rank. The check
    # runs before the CUDA check, so it answers on this GPU-less machine too.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="--backend hf"):
        backends.choose("unsloth")
    assert backends.choose("auto") == "hf"


def test_presets_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(DDP)).distributed_type == "MULTI_GPU"
    fsdp = load_config_from_file(str(FSDP))
    assert fsdp.distributed_type == "FSDP"
    assert fsdp.fsdp_config["fsdp_use_orig_params"] is False
    assert fsdp.fsdp_config["fsdp_cpu_ram_efficient_loading"] and fsdp.fsdp_config["fsdp_sync_module_states"]

    import train

    script, model, _, export, training_args = train.parse(["--config", str(PRESET_70B)]).groups
    assert script.backend == "hf" and model.load_in_4bit and model.bnb_4bit_quant_storage == "bfloat16"
    assert training_args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert not export.merge and export.gguf == "none"
    assert yaml.safe_load(PRESET_70B.read_text())["backend"] == "hf"


def test_hf_backend_passes_the_4bit_storage_dtype_and_leaves_placement_to_fsdp(monkeypatch):
    from trl import ModelConfig

    from titletune import base_models
    from titletune.backends import hf

    base = base_models.resolve("embedded")
    args = ModelConfig(model_name_or_path=base, load_in_4bit=True, bnb_4bit_quant_storage="bfloat16")
    model, _ = hf.load(base, args)
    assert model.hf_quantizer.quantization_config.bnb_4bit_quant_storage == torch.bfloat16
    packed = [p for p in model.parameters() if type(p).__name__ == "Params4bit"]
    assert packed and all(p.dtype == torch.bfloat16 for p in packed)  # a float dtype FSDP can shard

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert hf._device_map(quantized=True) == {"": 1}  # each rank on its own card, not all on cuda:0
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert hf._device_map(quantized=True) is None


def test_prepare_only_reuses_the_cache_across_run_folders(tmp_path):
    args = ["--data", str(SAMPLE), "--max-samples", "33", "--prepare-only"]
    run_cli("train.py", *args, "--output-dir", str(tmp_path / "a"))
    second = run_cli("train.py", *args, "--output-dir", str(tmp_path / "b"))
    assert "data prep: reused cache" in second.stderr + second.stdout
    for name in prepare.CACHE_FILES:
        assert (tmp_path / "a" / "data" / name).read_bytes() == (tmp_path / "b" / "data" / name).read_bytes()
