"""llama.cpp on every CPU kind: the project's one GGUF loader, and what a crashed llama.cpp child is called.

On an Intel Xeon with AMX, a llama-cpp-python built there dies with SIGILL in llama.cpp's AMX matmul as soon as a
quantized GGUF sees a prompt of a few dozen tokens with more than one thread (llama.cpp PR #26954). The regression
test asks a quantized GGUF a prompt of over 128 tokens with 2 threads through titletune.llamacpp.load, in a child
process, so that on such a CPU the old loading path fails the test instead of killing pytest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from titletune import base_models, fidelity, llamacpp

ROOT = Path(__file__).resolve().parents[1]

LONG_QUESTION = (
    "I am buying a present for my niece, who is six and has just started ballet lessons twice a week. "
    "Her teacher asked the parents to find a skirt that is soft, light, easy to wash and that stays on while the "
    "children jump and turn. I found a listing called 'Girls Ballet Tutu Neon Pink' with three layers of tulle and an "
    "elastic waist, and another one called 'Girls Ballet Tutu Neon Blue' that looks almost the same in the photos. "
    "Could you tell me what the pink one is, what it is made of, which ages it fits, and whether it is a good choice "
    "for a child who dances every week? Please answer in two or three sentences."
)

ANSWER = """
import json, sys
from titletune import llamacpp
llm = llamacpp.load(sys.argv[1], threads=2)
prompt = llm.tokenize(sys.argv[2].encode(), add_bos=False, special=False)
reply = llm.create_chat_completion(
    messages=[{"role": "user", "content": sys.argv[2]}], max_tokens=16, temperature=0.0, seed=0
)
print(json.dumps({"prompt_tokens": reply["usage"]["prompt_tokens"], "question_tokens": len(prompt),
                  "answer": reply["choices"][0]["message"]["content"],
                  "extra_bufts": bool(llm.model_params.use_extra_bufts)}))
"""


def _answer(path: Path) -> dict:
    import json

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(
        [sys.executable, "-c", ANSWER, str(path), LONG_QUESTION],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert result.returncode == 0, (
        f"{path.name} in llama.cpp exited {result.returncode} ({llamacpp.crash(result.returncode)}):\n"
        f"{result.stderr[-2000:]}\nbuild: {llamacpp.system_info()}"
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_quantized_gguf_answers_a_long_prompt_on_two_threads():
    """The embedded model's Q4_1 GGUF (a quantized type with AMX kernels) answers a 128+ token prompt."""
    got = _answer(base_models.embedded_gguf())
    assert got["prompt_tokens"] >= 128 and got["question_tokens"] >= 120
    assert got["answer"].strip()
    assert got["extra_bufts"] is False  # loaded as the project loads every GGUF


def test_the_runs_quantized_files_answer_a_long_prompt(trained_run):
    """Every quantized GGUF a training run wrote (q4_k_m in the fixture; q8_0 by default) answers the same way."""
    quants = [p for p in trained_run.glob("model.*.gguf") if not p.name.endswith(("f16.gguf", "bf16.gguf"))]
    assert quants
    for path in quants:
        assert _answer(path)["answer"].strip()


@pytest.mark.parametrize(
    ("returncode", "words"),
    [
        (-signal.SIGILL, ["SIGILL", "illegal instruction", "is not the cause", "--force-reinstall"]),
        (128 + signal.SIGILL, ["SIGILL", "illegal instruction"]),
        (-signal.SIGKILL, ["SIGKILL", "memory"]),
        (-signal.SIGSEGV, ["llama.cpp crashed", "SIGSEGV"]),
    ],
)
def test_a_crash_is_named_by_its_signal(returncode, words):
    message = llamacpp.crash(returncode)
    for word in words:
        assert word in message
    assert llamacpp.crash(0) is None and llamacpp.crash(1) is None and llamacpp.crash(2) is None


def test_a_child_killed_by_sigill_is_an_engine_crash_and_the_file_stays(tmp_path, monkeypatch):
    """A real llama.cpp child that dies by SIGILL (sent by a sitecustomize on its path, the same signal the AMX
    path raises) is reported as llama.cpp's crash with the fix, and the GGUF it was measuring is left in place."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import os, signal
            with open("/proc/self/cmdline", "rb") as f:
                if b"titletune.llamacpp_child" in f.read():
                    os.kill(os.getpid(), signal.SIGILL)
            """
        )
    )
    gguf = tmp_path / "model.q4_1.gguf"
    gguf.symlink_to(base_models.embedded_gguf())
    monkeypatch.setenv("PYTHONPATH", str(hook))
    with pytest.raises(fidelity.EngineCrash) as err:
        fidelity.child(gguf, {"op": "answer", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    message = str(err.value)
    assert "SIGILL" in message and "illegal instruction" in message and "model.q4_1.gguf" in message
    assert gguf.exists()


def test_the_modelfile_pins_the_reports_decoding(trained_run):
    """`ollama run` decodes as the report scored: greedy, no repetition penalty (Ollama before 0.32.10 applies 1.1
    when none is given), and the run's answer length, read back from run_config.yaml and report.json."""
    import json

    import yaml

    from titletune import ollama
    from titletune.sampling import ANSWER_TEMPLATE_TOKENS

    params = ollama.parameters(trained_run / "Modelfile")
    config = yaml.safe_load((trained_run / "run_config.yaml").read_text())
    sampling = json.loads((trained_run / "report.json").read_text())["settings"]["sampling"]
    assert float(params["temperature"]) == sampling["temperature"] == 0
    assert float(params["repeat_penalty"]) == sampling["repetition_penalty"] == 1
    assert int(params["num_predict"]) == sampling["max_new_tokens"]
    chars = int(config["data"]["max_content_chars"])
    assert int(params["num_predict"]) == chars // 4 + ANSWER_TEMPLATE_TOKENS
    assert int(params["num_ctx"]) == llamacpp.N_CTX
    assert "<|im_end|>" in params["stop"]
    assert ollama.gguf_name(trained_run / "Modelfile") == "model.q4_k_m.gguf"


def test_the_model_cards_python_snippet_answers(trained_run):
    """The card's llama-cpp-python snippet, run as a hub user would run it (plain llama_cpp, no titletune), loads the
    run's GGUF without extra buffer types and answers."""
    import re

    card = (trained_run / "README.md").read_text()
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", card, re.S) if "llama_cpp" in block)
    assert "use_extra_bufts = False" in snippet
    check = snippet + "\nassert llm.model_params.use_extra_bufts is False\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=trained_run,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()
