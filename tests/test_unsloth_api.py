"""Every keyword we pass to Unsloth exists in the pinned unsloth's source: the CUDA loader (unsloth.models) and the
CPU loader (unsloth_zoo.cpu) alike, since FastLanguageModel is a different class on each device.

The source is read from the installed packages with ast and never imported: importing unsloth patches
transformers for the whole test session. The installed versions must be the pinned ones. The last tests check what
the CUDA path (bench/gpu_check.py) relies on in the pinned Unsloth, transformers and bitsandbytes the same way.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
from pathlib import Path

import pytest

from titletune.config import ROOT

OURS = ROOT / "titletune" / "backends" / "unsloth.py"


def pinned(name: str) -> str:
    text = (ROOT / "requirements-nodeps.txt").read_text()
    match = re.search(rf"^{re.escape(name)}==(\S+)", text, re.MULTILINE)
    assert match, f"{name} is not pinned in requirements-nodeps.txt"
    return match.group(1)


def installed_source(dist: str) -> dict[str, str]:
    """{relative path: text} of a distribution's .py files, checked to be the pinned version."""
    assert importlib.metadata.version(dist) == pinned(dist), f"{dist} installed is not the pinned version"
    files = importlib.metadata.distribution(dist).files or []
    return {str(f): Path(f.locate()).read_text(encoding="utf-8") for f in files if str(f).endswith(".py")}


@pytest.fixture(scope="module")
def unsloth_source() -> dict[str, str]:
    return installed_source("unsloth")


@pytest.fixture(scope="module")
def zoo_source() -> dict[str, str]:
    return installed_source("unsloth_zoo")


def function_params(source: str, func: str, cls: str | None = None) -> set[str]:
    """Named parameters of `cls.func` (or module-level `func`); **kwargs does not count as accepting anything."""
    tree = ast.parse(source)
    scopes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls] if cls else [tree]
    for scope in scopes:
        for node in ast.iter_child_nodes(scope):
            if isinstance(node, ast.FunctionDef) and node.name == func:
                a = node.args
                return {p.arg for p in a.posonlyargs + a.args + a.kwonlyargs}
    raise AssertionError(f"{cls + '.' if cls else ''}{func} not found")


def our_keywords(method: str) -> set[str]:
    """Keyword names in our calls to <anything>.<method>(...) in the unsloth backend."""
    found = set()
    for node in ast.walk(ast.parse(OURS.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method:
            found |= {k.arg for k in node.keywords if k.arg}
    assert found, f"the unsloth backend makes no {method}() call"
    return found


def assert_accepts(source: str, method: str, func: str, cls: str | None = None) -> None:
    """Every keyword our backend passes to <x>.<method>(...) is a named parameter of `cls.func` in `source`."""
    params = function_params(source, func, cls)
    ours = our_keywords(method)
    assert ours <= params, ours - params


def test_from_pretrained_keywords_exist(unsloth_source):
    assert_accepts(
        unsloth_source["unsloth/models/loader.py"], "from_pretrained", "from_pretrained", "FastLanguageModel"
    )


def test_get_peft_model_keywords_exist(unsloth_source):
    # FastLanguageModel inherits get_peft_model from FastLlamaModel.
    source = unsloth_source["unsloth/models/llama.py"]
    assert "class FastLanguageModel(FastLlamaModel)" in unsloth_source["unsloth/models/loader.py"]
    assert_accepts(source, "get_peft_model", "get_peft_model", "FastLlamaModel")
    assert 'use_gradient_checkpointing = "unsloth"' in source.replace("'", '"')


def test_save_pretrained_merged_keywords_exist(unsloth_source):
    source = unsloth_source["unsloth/save.py"]
    assert_accepts(source, "save_pretrained_merged", "unsloth_save_pretrained_merged")
    assert '"merged_16bit"' in source


def test_cpu_init_makes_fastlanguagemodel_the_cpu_loader(unsloth_source, zoo_source):
    """Without a GPU, `from unsloth import FastLanguageModel` gives unsloth_zoo.cpu's FastCPUModel."""
    assert "from ._cpu_init import" in unsloth_source["unsloth/__init__.py"]
    cpu_init = unsloth_source["unsloth/_cpu_init.py"]
    assert "class FastLanguageModel(FastCPUModel)" in cpu_init and "from unsloth_zoo.cpu import" in cpu_init
    assert "merged_16bit" in zoo_source["unsloth_zoo/cpu/loader.py"]


@pytest.mark.parametrize(
    "method, func, cls",
    [
        ("from_pretrained", "from_pretrained", "FastCPUModel"),
        ("get_peft_model", "get_peft_model", "FastCPUModel"),
        ("save_pretrained_merged", "save_pretrained_merged", None),  # module-level, bound onto the model
    ],
)
def test_cpu_loader_accepts_our_keywords(zoo_source, method, func, cls):
    assert_accepts(zoo_source["unsloth_zoo/cpu/loader.py"], method, func, cls)


def test_unsloth_is_imported_only_by_its_backend():
    """No other module imports unsloth, so CPU users never need it and it is imported only when chosen."""
    offenders = []
    for path in list((ROOT / "titletune").rglob("*.py")) + [ROOT / "train.py", ROOT / "infer.py"]:
        if path == OURS or not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "unsloth" or n.startswith("unsloth.") for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    # backends/__init__.py imports it on purpose, first, when the unsloth backend is chosen.
    assert offenders == ["__init__.py:" + str(_line_of_backend_import())], offenders


def _line_of_backend_import() -> int:
    source = (ROOT / "titletune" / "backends" / "__init__.py").read_text()
    return next(i for i, line in enumerate(source.splitlines(), 1) if line.strip().startswith("import unsloth"))


# ------------------------------------------------------------------ what the CUDA path relies on (bench/gpu_check.py)


def pinned_source(module: str, relative: str) -> str:
    """A file of an installed package (transformers, bitsandbytes: pinned in requirements-cpu.txt), found by spec."""
    import importlib.util

    return (Path(importlib.util.find_spec(module).origin).parent / relative).read_text(encoding="utf-8")


def test_bitsandbytes_config_keywords_exist():
    """BitsAndBytesConfig takes **kwargs, so a misspelt keyword would be dropped with a log line, not refused. Ours
    reach it through trl.get_quantization_config (backends/hf.py) and gpu_check.py's own call: every keyword of both
    must be one of BitsAndBytesConfig's parameters, in the pinned transformers."""
    params = function_params(
        pinned_source("transformers", "utils/quantization_config.py"), "__init__", "BitsAndBytesConfig"
    )
    sources = {
        "trl.get_quantization_config": pinned_source("trl", "trainer/utils.py"),
        "gpu_check.py": (ROOT / "bench" / "gpu_check.py").read_text(),
    }
    for name, source in sources.items():
        calls = [
            node
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "BitsAndBytesConfig"
        ]
        assert calls, name
        for call in calls:
            ours = {k.arg for k in call.keywords if k.arg}
            assert ours <= params, (name, ours - params)
    assert "get_quantization_config(" in (ROOT / "titletune" / "backends" / "hf.py").read_text()


def test_what_gpu_check_reads_of_unsloth_is_there(unsloth_source):
    """gpu_check tells Unsloth's CUDA path from its CPU backend by these, and checks the merge against the adapter
    on the dequantized 4-bit base, quantized as Unsloth's loader does (nested)."""
    assert "Fast {model_patcher.__name__[4:-5]} patching" in unsloth_source["unsloth/models/llama.py"]
    assert "no GPU found" in unsloth_source["unsloth/_cpu_init.py"]
    assert "_IS_CPU_BACKEND = True" in unsloth_source["unsloth/__init__.py"]
    save = unsloth_source["unsloth/save.py"].replace(" ", "")
    merge = save[save.index("def_merge_lora(") : save.index("deffast_save_pickle(")]
    assert "W=fast_dequantize(W,quant_state)" in merge and "W.addmm_(" in merge
    llama = unsloth_source["unsloth/models/llama.py"].replace(" ", "")
    assert "bnb_4bit_use_double_quant=True," in llama and 'bnb_4bit_quant_type="nf4",' in llama


def test_bitsandbytes_loads_the_cuda130_library_for_any_cuda_13():
    """The GPU check ships only libbitsandbytes_cuda130.so: bitsandbytes takes the highest packaged library of the
    same major version at or below the runtime's (13.2 -> 13.0), never another major."""
    source = pinned_source("bitsandbytes", "cextension.py")
    assert "lower = [v for v in available if v[0] == runtime_version[0] and v < runtime_version]" in source
    assert "selected = max(lower)" in source
