"""infer.py as a real subprocess on a tiny run: the embedded SmolLM2-135M-Instruct plus a random LoRA adapter."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INFER = ROOT / "infer.py"

# Invented products, written for these tests.
TRAIN = [
    (
        "t1",
        "Girls Ballet Tutu Zebra Stripes",
        "A layered tulle tutu for girls aged 2 to 6, with black and white zebra stripes and a soft elastic waist.",
    ),
    (
        "t2",
        "Stainless Steel Garlic Press Pro",
        "Crushes unpeeled cloves in one squeeze. Dishwasher safe, with a built-in cleaner that pushes out the skins.",
    ),
    (
        "t3",
        "Hiking Socks Merino Wool 3 Pack",
        "Cushioned merino wool socks that keep feet dry on long trails. Three pairs, sizes 8 to 12.",
    ),
    (
        "t4",
        "Bamboo Cutting Board Large",
        "A large bamboo board with a juice groove, gentle on knives and easy to clean by hand.",
    ),
    (
        "t5",
        "LED Desk Lamp With USB Port",
        "A dimmable desk lamp with five brightness levels, a flexible neck and a USB port to charge a phone.",
    ),
    (
        "t6",
        "Kids Watercolor Paint Set 24 Colors",
        "Twenty-four washable watercolor cakes with two brushes, made for young artists and easy cleanup.",
    ),
]
TEST = [
    (
        "h1",
        "Silicone Baking Mat Set of Two",
        "Two non-stick silicone mats that fit half sheet pans; no parchment paper needed and reusable for years.",
    ),
    (
        "h2",
        "Wireless Computer Mouse Silent Click",
        "A quiet wireless mouse with a USB receiver, three DPI levels and an 18-month battery life.",
    ),
    (
        "h3",
        "Ceramic Coffee Mug With Lid",
        "A 12 ounce ceramic mug with a bamboo lid that keeps coffee warm on the desk.",
    ),
]


def build_run(root: Path) -> Path:
    """A run folder as train.py writes it, with a LoRA adapter whose B matrices are non-zero (tuned != base)."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from titletune import base_models, prompts

    run = root / "run"
    run.mkdir(parents=True)
    shutil.copytree(ROOT / "prompts" / "qa", run / "prompts")
    base = str(base_models.embedded_hf_dir())
    seed = 42
    cfg = {
        "base_model": base,
        "backend": "hf",
        "seed": seed,
        "trust_remote_code": False,
        "max_length": 256,
        "model": {"model_name_or_path": "embedded"},
        "data": {"title_field": "title", "content_field": "content"},
        "export": {},
        "training": {},
    }
    (run / "run_config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    ps = prompts.load(run / "prompts")
    (run / "data").mkdir()
    for name, rows in (("train", TRAIN), ("test", TEST)):
        with open(run / "data" / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for pid, title, content in rows:
                row = {"id": pid, "title": title, "content": content, **prompts.render(ps, title, content, pid, seed)}
                f.write(json.dumps(row) + "\n")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    # peft starts B at zero (adapter = no-op). Std 0.2 (tried 0.05-0.4) changes the first tokens of short greedy
    # answers while keeping them English.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "adapter")
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("infer"))


def infer(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120", "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, str(INFER), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


def test_side_by_side_prints_both_answers(run_dir):
    proc = infer("What is 'Girls Ballet Tutu Neon Pink'?", "--run", str(run_dir), "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert "BASE" in proc.stdout and "TUNED" in proc.stdout
    assert "Girls Ballet Tutu Neon Pink" in proc.stdout  # the question is echoed above the answers


def test_json_base_differs_from_tuned(run_dir):
    proc = infer(
        "Tell me about Hiking Socks Merino Wool 3 Pack.", "--run", str(run_dir), "--max-new-tokens", "12", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["run"] == str(run_dir) and out["engine"] == "transformers"
    assert out["base"] and out["tuned"] and out["base"] != out["tuned"]


def test_rag_prints_the_retrieved_titles_and_the_grounded_answer(run_dir):
    question = "What is 'Girls Ballet Tutu Neon Pink'?"
    proc = infer(question, "--run", str(run_dir), "--rag", "--rag-k", "2", "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert "retrieved 1: Girls Ballet Tutu Zebra Stripes" in proc.stdout  # the nearest training product
    assert "retrieved 3: " not in proc.stdout  # at most --rag-k; the other products share no word with it
    assert "BASE" in proc.stdout and "TUNED" in proc.stdout and "TUNED+RAG" in proc.stdout
    out = json.loads(infer(question, "--run", str(run_dir), "--rag", "--max-new-tokens", "12", "--json").stdout)
    assert out["retrieved"] == ["Girls Ballet Tutu Zebra Stripes"]
    assert out["base"] and out["tuned"] and out["tuned+rag"]
    assert out["sampling"]["max_new_tokens"] == 12 and out["sampling"]["repetition_penalty"] == 1.0
    proc = infer(question, "--run", str(run_dir), "--rag-k", "2")
    assert proc.returncode == 2 and "--rag-k and --rag-index are for RAG answers: add --rag" in proc.stderr


def test_default_answer_length_comes_from_the_run(run_dir):
    out = json.loads(
        infer("What is 'Bamboo Cutting Board Large'?", "--run", str(run_dir), "--only", "tuned", "--json").stdout
    )
    # build_run records no max_content_chars: DataArguments' default, 400 characters -> 400 // 4 + 28 tokens
    assert out["sampling"]["max_new_tokens"] == 128


def test_only_tuned(run_dir):
    proc = infer(
        "What is 'Bamboo Cutting Board Large'?",
        "--run",
        str(run_dir),
        "--only",
        "tuned",
        "--max-new-tokens",
        "8",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["tuned"] and out["base"] is None


def test_llamacpp_base_answers_from_embedded_gguf(run_dir):
    from titletune import base_models

    proc = infer(
        "What is 'LED Desk Lamp With USB Port'?",
        "--run",
        str(run_dir),
        "--engine",
        "llamacpp",
        "--only",
        "base",
        "--max-new-tokens",
        "12",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["base"] and out["engine"] == "llamacpp" and out["base_gguf"] == str(base_models.embedded_gguf())


def test_llamacpp_uses_the_runs_gguf(gguf_run):
    from titletune import base_models

    proc = infer(
        "What is 'LED Desk Lamp With USB Port'?",
        "--run",
        str(gguf_run),
        "--engine",
        "llamacpp",
        "--max-new-tokens",
        "12",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["gguf"] == str(gguf_run / "model.q4_k_m.gguf") and out["base_gguf"] == str(base_models.embedded_gguf())
    assert out["base"] == out["tuned"]  # the same weights under two names: same greedy answer


def test_interactive_answers_each_line_and_exits_cleanly_on_eof(run_dir):
    proc = subprocess.run(
        [
            sys.executable,
            str(INFER),
            "chat",
            "--run",
            str(run_dir),
            "--engine",
            "llamacpp",
            "--only",
            "base",
            "--max-new-tokens",
            "8",
            "--json",
        ],
        input="What is 'Bamboo Cutting Board Large'?\n\nTell me about Hiking Socks.\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    answers = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [a["question"] for a in answers] == ["What is 'Bamboo Cutting Board Large'?", "Tell me about Hiking Socks."]
    assert all(a["base"] and a["tuned"] is None for a in answers)


def test_render_columns_or_stacked():
    sys.path.insert(0, str(ROOT))
    import infer as infer_module

    answers = {"BASE": "short answer " * 20, "TUNED": "another answer " * 20}
    wide = infer_module.render("Q?", answers, width=120)
    assert all(len(line) <= 120 for line in wide.splitlines()) and " | " in wide
    narrow = infer_module.render("Q?", answers, width=60)
    assert " | " not in narrow and narrow.index("BASE") < narrow.index("TUNED")
    assert all(len(line) <= 60 for line in narrow.splitlines())
    three = infer_module.render("Q?", {**answers, "TUNED+RAG": "grounded " * 20}, width=150, retrieved=["A", "B"])
    assert "retrieved 1: A" in three and "retrieved 2: B" in three
    assert max(line.count(" | ") for line in three.splitlines()) == 2
    assert all(len(line) <= 150 for line in three.splitlines())
    assert " | " not in infer_module.render("Q?", {**answers, "TUNED+RAG": "x"}, width=100)  # stacked below 120


def test_help_documents_every_command_and_flag():
    """The overview names the four commands; each command's --help documents every flag it takes, and only those."""
    overview = infer("--help")
    assert overview.returncode == 0
    for command in ("ask", "chat", "evaluate", "serve"):
        assert f"  {command}  " in overview.stdout
    run_flags = ("--run", "--outputs", "--gguf", "--base-gguf", "--threads")
    engine = ("--engine", "--use-merged", "--only", "--dtype", "--trust-remote-code")
    sampling = ("--max-new-tokens", "--temperature", "--top-p", "--top-k", "--repetition-penalty", "--num-beams")
    rag = ("--rag-k", "--rag-index")
    expected = {
        "ask": (*run_flags, *engine, *sampling, "--json", "--rag", *rag),
        "chat": (*run_flags, *engine, *sampling, "--json", "--rag", *rag),
        "evaluate": (*run_flags, *engine, *sampling, "--data", "--samples", "--seed", *rag),
        "serve": (*run_flags, "--host", "--port", "--api-key", "--max-queue", "--request-timeout", *rag),
    }
    for command, flags in expected.items():
        proc = infer(command, "--help")
        assert proc.returncode == 0, proc.stderr
        for flag in flags:
            assert flag in proc.stdout, (command, flag)
        assert ("--port" in proc.stdout) == (command == "serve") and ("--samples" in proc.stdout) == (
            command == "evaluate"
        )


def test_help_into_a_closed_pipe_ends_quietly():
    """`python infer.py --help | head`: a reader that is gone before the overview is written ends the command as a
    pipeline's writer ends (141), with no traceback."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone before Python has started
    try:
        proc = subprocess.run(
            [sys.executable, str(INFER), "--help"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
            cwd=ROOT,
            check=False,
        )
    finally:
        os.close(write)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""


def test_the_old_mode_flags_still_name_their_commands():
    """--interactive, --evaluate and --serve from before the commands: each reads as the command it names."""
    import infer as infer_module

    assert infer_module.split_command(["--interactive", "--only", "tuned"]) == ("chat", ["--only", "tuned"])
    assert infer_module.split_command(["--run", "R", "--evaluate"]) == ("evaluate", ["--run", "R"])
    assert infer_module.split_command(["--serve", "true", "--port", "9"]) == ("serve", ["--port", "9"])
    assert infer_module.split_command(["--serve=false", "Q?"]) == ("ask", ["Q?"])
    assert infer_module.split_command(["What is 'chat'?"]) == ("ask", ["What is 'chat'?"])


def test_no_run_is_a_one_line_error(tmp_path):
    proc = infer("What is it?", "--outputs", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "python train.py" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--engine", "llamacpp", "--only", "tuned"], "no GGUF export"),
        (["--gguf", "/nonexistent/model.gguf", "--engine", "llamacpp"], "does not exist"),
        (["--temperature", "-1"], "--temperature"),
        (["--use-merged"], "merged is missing"),
        (["--num-beams", "2", "--engine", "llamacpp", "--only", "base"], "--num-beams"),
    ],
)
def test_bad_arguments_are_one_line_errors(run_dir, args, message):
    proc = infer("What is it?", "--run", str(run_dir), *args)
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_openai_chat_request():
    from titletune import base_models

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            str(INFER),
            "serve",
            "--gguf",
            str(base_models.embedded_gguf()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        printed = [server.stdout.readline(), server.stdout.readline()]  # printed once the port is bound
        assert printed[0].startswith("serving ") and printed[1].strip().startswith("curl "), printed
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not answer within 60 s"
            time.sleep(0.5)
        body = json.dumps(
            {
                "messages": [{"role": "user", "content": "What is a garlic press?"}],
                "max_tokens": 16,
                "temperature": 0,
            }
        ).encode()
        req = urllib.request.Request(
            f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.load(r)["choices"][0]["message"]["content"]
        assert answer.strip()
        # The printed curl command works as printed, in a shell, although its question holds a single quote.
        curl = subprocess.run(["bash", "-c", printed[1].strip()], capture_output=True, text=True, timeout=120)
        assert curl.returncode == 0, curl.stderr
        assert json.loads(curl.stdout)["choices"][0]["message"]["content"].strip()
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stdout:
            server.stdout.close()


def test_serve_on_a_port_in_use_is_an_error_and_claims_nothing():
    from titletune import base_models

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, str(INFER), "serve", "--gguf", str(base_models.embedded_gguf()), "--port", str(port)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "serving" not in proc.stdout and "Traceback" not in proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "--port" in proc.stderr


LONG_QUESTION = "What is " + "a very long product title with many words " * 1400 + "?"  # 58,809 chars


@pytest.mark.parametrize("engine", ["transformers", "llamacpp"])
def test_a_question_longer_than_the_context_is_refused_before_generating(run_dir, engine):
    args = ["--engine", engine] + (["--only", "base"] if engine == "llamacpp" else [])
    proc = infer(LONG_QUESTION, "--run", str(run_dir), "--max-new-tokens", "8", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert re.search(r"the question is too long: 58,809 characters, [\d,]+ tokens with the prompt", proc.stderr)


def test_a_too_long_question_does_not_end_an_interactive_session(run_dir):
    proc = subprocess.run(
        [sys.executable, str(INFER), "chat", "--run", str(run_dir), "--engine", "llamacpp"]
        + ["--only", "base", "--max-new-tokens", "8", "--json"],
        input=f"{LONG_QUESTION}\nTell me about Hiking Socks.\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "error: the question is too long" in proc.stderr and "Traceback" not in proc.stderr
    answers = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [a["question"] for a in answers] == ["Tell me about Hiking Socks."] and answers[0]["base"]


def test_a_boolean_flag_before_the_question_is_a_switch():
    """`infer.py --rag "What is X?"` (the README's form): the question is not read as --rag's true/false value."""
    import infer

    question = "What is 'Girls Ballet Tutu Neon Pink'?"
    args = infer.parse_args(["--rag", question])
    assert args.rag is True and args.question == question
    args = infer.parse_args(["--json", "--rag", "--rag-k", "2", question])
    assert (args.json, args.rag, args.rag_k, args.question) == (True, True, 2, question)
    args = infer.parse_args(["--rag", "false", question])  # an explicit value still works
    assert args.rag is False and args.question == question
    assert infer.parse_args([question, "--rag"]).rag is True
