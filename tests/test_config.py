"""Defaults tell one story: every DEFAULTS value and every preset value reaches a run's resolved config.

train.parse runs in this process with --backend hf or a 4-bit preset (auto -> hf on CPU), so unsloth is never
imported here; the run_config.yaml test goes through the real CLI in a subprocess.
"""

from __future__ import annotations

import dataclasses
import enum

import pytest
import yaml
from conftest import ROOT, SAMPLE, run_cli

from titletune import backends, config, machine, runs
from titletune.config import DEFAULTS, DataArguments, ExportArguments, ScriptArguments

PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
OURS = {f.name: f.default for c in (ScriptArguments, DataArguments, ExportArguments) for f in dataclasses.fields(c)}


def resolved(parsed) -> dict:
    """Every parsed argument (train.parse's Invocation), flat, as run_config.yaml records it (enums as values)."""
    return {k: v for args in parsed.groups for k, v in runs.as_dict(args).items()}


def same(got, want) -> bool:
    if isinstance(got, enum.Enum):
        got = got.value
    if isinstance(got, list) and isinstance(want, str):  # report_to: "tensorboard" -> ["tensorboard"]
        return got == [want] or (want == "none" and got in ([], ["none"]))
    return got == want


def test_the_presets_are_the_gpu_setups_and_none_repeats_a_default():
    assert [p.name for p in PRESETS] == [
        "llama3_1_70b_fsdp_qlora.yaml",
        "llama3_1_8b_qlora.yaml",
        "llama3_2_3b_qlora.yaml",
        "mistral_7b_qlora.yaml",
    ]
    assert config.GPU_CONFIG in PRESETS
    for path in PRESETS:
        preset = yaml.safe_load(path.read_text())
        repeated = {k: v for k, v in preset.items() if k in DEFAULTS and DEFAULTS[k] == v}
        repeated |= {k: v for k, v in preset.items() if k in OURS and OURS[k] == v}
        assert not repeated, f"{path.name} repeats defaults {repeated}: say them once, in titletune/config.py"
    overlap = set(DEFAULTS) & set(OURS)
    assert not overlap, f"{overlap}: a default of our own dataclasses belongs on the field, not in DEFAULTS"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_parses_and_each_of_its_values_reaches_the_config(preset):
    import train

    values = resolved(train.parse(["--config", str(preset)]))
    for key, want in yaml.safe_load(preset.read_text()).items():
        assert key in values, f"{preset.name}: {key} is not a flag of train.py"
        assert same(values[key], want), f"{preset.name}: {key} = {want!r} resolved to {values[key]!r}"
    assert values["max_steps"] == -1  # every GPU preset trains by epochs, as DEFAULTS do
    for key, want in DEFAULTS.items():  # what the preset leaves alone is DEFAULTS'
        if key not in yaml.safe_load(preset.read_text()):
            assert same(values[key], want), f"{preset.name}: {key} should stay DEFAULTS' {want!r}"


def test_every_default_reaches_the_run_config_of_a_default_run(tmp_path):
    """The CPU run with no flags but where it is written, through the real CLI: run_config.yaml holds every value of
    DEFAULTS and of our own dataclasses' defaults."""
    run_dir = tmp_path / "run"
    run_cli("train.py", "--output-dir", str(run_dir), "--prepare-only")
    saved = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    flat = {k: v for section in runs.SECTIONS for k, v in saved[section].items()}
    assert saved["base_model"] == config.EMBEDDED
    for key, want in {**DEFAULTS, **OURS}.items():
        if key in ("output_dir", "prepare_only", "data", "backend"):  # given here; resolved: the sample, the backend
            continue
        assert same(flat[key], want), f"{key}: DEFAULTS say {want!r}, run_config.yaml has {flat[key]!r}"
    assert flat["data"] == str(SAMPLE)
    assert flat["output_dir"] == str(run_dir)
    assert saved["backend"] == backends.AUTO[machine.device()]  # auto, resolved for this machine


def test_a_changed_default_changes_the_resolved_config(monkeypatch):
    import train

    monkeypatch.setitem(DEFAULTS, "learning_rate", 1.25e-4)
    monkeypatch.setitem(DEFAULTS, "save_steps", 7)
    values = resolved(train.parse(["--backend", "hf"]))
    assert (values["learning_rate"], values["save_steps"]) == (1.25e-4, 7)
    # ... and a flag still beats it.
    assert resolved(train.parse(["--backend", "hf", "--learning-rate", "3e-4"]))["learning_rate"] == 3e-4


def test_epochs_given_anywhere_above_defaults_train_by_epochs(tmp_path):
    import train

    assert resolved(train.parse(["--backend", "hf"]))["max_steps"] == DEFAULTS["max_steps"]
    assert resolved(train.parse(["--backend", "hf", "--num-train-epochs", "2"]))["max_steps"] == -1
    own = tmp_path / "mine.yaml"
    own.write_text("num_train_epochs: 3\n")
    values = resolved(train.parse(["--backend", "hf", "--config", str(own)]))
    assert (values["num_train_epochs"], values["max_steps"]) == (3, -1)
    # Both given: the step count wins, as in the Trainer.
    both = resolved(train.parse(["--backend", "hf", "--num-train-epochs", "2", "--max-steps", "9"]))
    assert both["max_steps"] == 9


def test_settings_given_are_read_from_flags_and_the_config_file(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("learning_rate: 1.0e-4\nbackend: hf\n")
    argv = ["--config", str(own), "--max-steps=3", "--lora_r", "8"]
    asked = config.asked(argv)
    assert asked.names == {"learning_rate", "backend", "max_steps", "lora_r"}
    assert asked.value("backend", "auto") == "hf"
    assert asked.value("max_steps", "x") == "3"
    assert config.asked([]).value("backend", "auto") == "auto"
    assert config.asked(["--resume"]).value("resume", "x") == "x"  # a switch at the end has no value
