"""Safety: no remote code unless asked, safetensors only, no pickle from untrusted files, no shell strings, no network.

    trust_remote_code       off unless --trust-remote-code: run_config.yaml records False by default and True with
                            the flag; no call in our code passes a literal True
    safetensors only        every model weight load passes use_safetensors=True (or reads the embedded GGUF); no
                            save_pretrained passes safe_serialization=False; transformers 5 can only write
                            safetensors, peft defaults to it; a trained run holds no pickled weights outside
                            checkpoint-*/ (there, the Trainer's own optimizer/scheduler/rng state and training_args,
                            which it reloads with torch.load(weights_only=True) on --resume)
    no pickle               no pickle/dill/joblib/cloudpickle, torch.load only with weights_only=True, numpy.load
                            never with allow_pickle=True, yaml only through safe_load/safe_dump
    no shell strings        subprocesses take argument lists: no shell=True, os.system, os.popen, commands as strings
    no phoning home         a 1-step training run and infer.py on the embedded model, with every socket blocked and
                            HF_ENDPOINT dead, make no connection at all (TRL's telemetry and datasets' download
                            counter are turned off by models.disable_telemetry())
Scanned code: titletune/, train.py and infer.py; bench/ too for pickle and subprocesses.
"""

from __future__ import annotations

import ast
import inspect
import os
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SAMPLE, run_cli

PRODUCT = sorted([*(ROOT / "titletune").rglob("*.py"), ROOT / "train.py", ROOT / "infer.py"])
CODE = PRODUCT + sorted((ROOT / "bench").rglob("*.py"))  # bench/ loads only our own files, but runs subprocesses
PICKLED = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"}
TRAINER_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "scaler.pt"}


def calls(files: list[Path] = CODE):
    """(where, call node) for every call in `files`."""
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Call):
                yield f"{path.relative_to(ROOT)}:{node.lineno}", node


def name(node: ast.AST) -> str:
    """Dotted name of a call target: torch.load, AutoModelForCausalLM.from_pretrained, model.save_pretrained."""
    if isinstance(node, ast.Attribute):
        return f"{name(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Call):
        return name(node.func) + "()"
    return "?"


def keyword(call: ast.Call, key: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == key), None)


def is_const(node: ast.AST | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def test_the_scan_sees_the_code():
    found = {name(call.func) for _, call in calls()}
    assert {"AutoModelForCausalLM.from_pretrained", "AutoTokenizer.from_pretrained", "subprocess.run"} <= found
    assert any(target.endswith(".save_pretrained") for target in found)


# ------------------------------------------------------------------------------------------ trust_remote_code


def test_trust_remote_code_is_never_a_literal_true():
    bad = [
        where
        for where, call in calls(PRODUCT)
        if (value := keyword(call, "trust_remote_code")) is not None
        and isinstance(value, ast.Constant)
        and value.value is not False
    ]
    assert not bad, f"trust_remote_code must come from the command's --trust-remote-code, not a literal: {bad}"


@pytest.mark.parametrize("flag, expected", [([], False), (["--trust-remote-code"], True)])
def test_trust_remote_code_is_off_unless_asked(tmp_path, flag, expected):
    run = tmp_path / "run"
    run_cli(
        "train.py",
        "--prepare-only",
        "--data",
        str(SAMPLE),
        "--max-samples",
        "8",
        "--output-dir",
        str(run),
        *flag,
        timeout=300,
    )
    config = yaml.safe_load((run / "run_config.yaml").read_text(encoding="utf-8"))
    assert config["trust_remote_code"] is expected and config["training"]["trust_remote_code"] is expected
    assert config["model"].get("trust_remote_code", expected) is expected


# --------------------------------------------------------------------------------------------------- safetensors


def test_model_weights_load_as_safetensors():
    """Every load of model weights passes use_safetensors=True: a hub or local folder with only pickled *.bin
    weights is refused instead of unpickled. Exempt, each for its reason: tokenizers (no weights); the embedded model
    read from its GGUF (gguf_file=, a data format); PeftModel.from_pretrained, which reads our own adapter/ (written as
    safetensors) and falls back only to torch.load(weights_only=True); unsloth's loader (CUDA only, 4-bit
    safetensors checkpoints)."""
    loads = [(where, call) for where, call in calls(PRODUCT) if name(call.func).endswith(".from_pretrained")]
    models = [
        (where, call)
        for where, call in loads
        if name(call.func).split(".")[-2].startswith("AutoModel") or "ForCausalLM" in name(call.func)
    ]
    assert len(models) >= 3
    bad = [
        where
        for where, call in models
        if not is_const(keyword(call, "use_safetensors"), True) and keyword(call, "gguf_file") is None
    ]
    assert not bad, f"from_pretrained of model weights without use_safetensors=True: {bad}"
    others = {name(call.func).split(".")[-2] for _, call in loads} - {name(c.func).split(".")[-2] for _, c in models}
    assert others <= {"AutoTokenizer", "PeftModel", "FastLanguageModel"}, others


def test_models_save_as_safetensors():
    bad = [
        where
        for where, call in calls(PRODUCT)
        if name(call.func).endswith((".save_pretrained", ".save_pretrained_merged"))
        and (value := keyword(call, "safe_serialization")) is not None
        and not is_const(value, True)
    ]
    assert not bad, f"save_pretrained with safe_serialization other than True: {bad}"


def test_libraries_save_safetensors_by_default():
    """What we rely on when a call leaves safe_serialization out. transformers 5 dropped the option: save_pretrained
    writes safetensors only (safe_serialization=True that we still pass lands in **kwargs, unused). peft's default
    is True."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    assert "safe_serialization" not in inspect.signature(PreTrainedModel.save_pretrained).parameters
    source = inspect.getsource(PreTrainedModel.save_pretrained)
    assert "safe_save_file(" in source and "torch.save(" not in source
    assert inspect.signature(PeftModel.save_pretrained).parameters["safe_serialization"].default is True


def test_trained_run_holds_no_pickled_weights(trained_run):
    files = [p for p in trained_run.rglob("*") if p.is_file()]
    outside = [
        p
        for p in files
        if p.suffix in PICKLED and not any(part.startswith("checkpoint-") for part in p.relative_to(trained_run).parts)
    ]
    assert not outside, outside
    inside = {p.name for p in files if p.suffix in PICKLED} - TRAINER_STATE
    assert not inside, f"pickled files in checkpoints other than the Trainer's own state: {inside}"
    weights = {p.relative_to(trained_run).as_posix() for p in files if p.suffix == ".safetensors"}
    assert {"adapter/adapter_model.safetensors", "merged/model.safetensors"} <= weights, weights


# ---------------------------------------------------------------------------------------------- pickle and shell


def test_no_pickle_loading():
    bad = []
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad += [
                    f"{path.name}:{node.lineno} import {m}"
                    for m in modules
                    if m.split(".")[0] in {"pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve"}
                ]
    for where, call in calls():
        target = name(call.func)
        if target.endswith("torch.load") and not is_const(keyword(call, "weights_only"), True):
            bad.append(f"{where} torch.load without weights_only=True")
        if target.endswith(("np.load", "numpy.load")) and is_const(keyword(call, "allow_pickle"), True):
            bad.append(f"{where} numpy.load(allow_pickle=True)")
        if target in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"):
            bad.append(f"{where} {target}: use yaml.safe_load")
    assert not bad, bad


def test_subprocesses_take_argument_lists():
    bad = []
    for where, call in calls():
        target = name(call.func)
        if is_const(keyword(call, "shell"), True):
            bad.append(f"{where} shell=True")
        if target in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
            bad.append(f"{where} {target}")
        if target.startswith("subprocess.") and call.args and isinstance(call.args[0], (ast.Constant, ast.JoinedStr)):
            bad.append(f"{where} {target} with a command string")
    assert not bad, bad


# ---------------------------------------------------------------------------------------------------- network

GUARD = """
import os, socket

LOG = os.environ["NETGUARD_LOG"]
open(LOG + ".loaded", "w").close()


def _record(what):
    with open(LOG, "a") as f:
        f.write(f"{os.getpid()} {what}\\n")


_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _record(f"connect {address}")
        raise ConnectionRefusedError("network blocked by tests/test_safety.py")
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _record(f"connect_ex {address}")
        return 111
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    _record(f"getaddrinfo {host}")
    raise socket.gaierror("network blocked by tests/test_safety.py")


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
"""


def test_nothing_phones_home(tmp_path, monkeypatch):
    """The embedded model end to end (data, model, SFTTrainer, adapter, inference) with every TCP connection and DNS
    lookup refused and recorded by a sitecustomize in each process. The user's own opt-outs are cleared, and CI too
    (TRL skips its telemetry under CI), so what is tested is our code's own behaviour."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD, encoding="utf-8")
    log = tmp_path / "network.log"
    for var in (
        "CI",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "HF_HUB_DISABLE_TELEMETRY",
        "HF_UPDATE_DOWNLOAD_COUNTS",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(guard), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("NETGUARD_LOG", str(log))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a second wall: nothing listens there
    run = tmp_path / "run"
    run_cli(
        "train.py",
        "--data",
        str(SAMPLE),
        "--output-dir",
        str(run),
        "--max-samples",
        "8",
        "--max-steps",
        "1",
        "--per-device-train-batch-size",
        "2",
        "--max-length",
        "64",
        "--max-content-chars",
        "100",
        "--gguf",
        "none",
        "--no-merge",
        "--eval-samples",
        "0",
        timeout=600,
    )
    assert Path(f"{log}.loaded").is_file(), "the socket guard did not load"
    assert not log.exists(), log.read_text()
    out = run_cli(
        "infer.py",
        "What is 'Girls Ballet Tutu Neon Pink'?",
        "--run",
        str(run),
        "--max-new-tokens",
        "4",
        "--json",
        timeout=600,
    ).stdout
    assert '"tuned"' in out and '"base"' in out
    assert not log.exists(), log.read_text()
