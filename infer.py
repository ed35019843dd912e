"""Ask the base and the fine-tuned model the same question, side by side; chat; evaluate a run; or serve both models.

The most recent run in outputs/ is used unless --run says otherwise. Questions go through the run's own
prompts/ and the model's chat template, exactly as in training.

    python infer.py "What is 'Girls Ballet Tutu Neon Pink'?"                    # ask: base | tuned, latest run
    python infer.py ask "Tell me about Hiking Socks." --run outputs/<run> --json  # one JSON object
    python infer.py ask --rag "What is 'Girls Ballet Tutu Neon Pink'?"           # + tuned with catalogue entries
    python infer.py ask --rag --rag-index data/trn.json "Tell me about ..."      # search the whole catalogue
    python infer.py ask "What is ...?" --engine llamacpp                         # the GGUF the run ships
    python infer.py ask "What is ...?" --engine llamacpp --gguf outputs/<run>/model.q8_0.gguf --base-gguf base.gguf
    python infer.py chat --only tuned                                            # a prompt loop; Ctrl-D quits
    python infer.py evaluate --samples 20                                        # report.{json,md,png} in the run
    python infer.py evaluate --data data/trn.json --samples 50                   # products of any trn file
    python infer.py serve                                  # playground at http://127.0.0.1:8000/, API at /v1
    python infer.py serve --gguf outputs/<run>/model.q8_0.gguf --port 8001          # another file as "tuned"
    python infer.py serve --rag-index data/trn.json       # "tuned+rag" searches the whole catalogue
    python infer.py serve --host 0.0.0.0       # other machines too: needs $TITLETUNE_API_KEY (or --api-key)

On a CUDA machine the transformers engine uses the GPU by itself; nothing changes in the commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import shutil
import sys
import textwrap
from pathlib import Path

from titletune.config import RAG_K
from titletune.errors import Problems, UserError, cli, full_disk_is_user_error

SIDE_BY_SIDE_MIN = 80  # narrower terminals get stacked blocks: two 38-column answers are hard to read
# What each command does, for the overview (`python infer.py --help`) and its own --help.
COMMANDS = {
    "ask": "Ask one question; base and tuned answer side by side (the command when none is named).",
    "chat": "Ask questions in a loop, each answered as `ask` does; Ctrl-C or Ctrl-D quits.",
    "evaluate": "Score six systems on seen and held-out products; writes report.json/.md/.png and the card.",
    "serve": "The playground page and an OpenAI-compatible API: models 'tuned', 'base' and 'tuned+rag'.",
}
# The mode flags these commands replace; still accepted, as the command they name.
OLD_FLAGS = {"--interactive": "chat", "--evaluate": "evaluate", "--serve": "serve"}
TRUE_WORDS = {"yes", "true", "t", "y", "1"}  # the words HfArgumentParser reads as a boolean flag's value
BOOL_WORDS = TRUE_WORDS | {"no", "false", "f", "n", "0"}


class _Help(argparse.RawDescriptionHelpFormatter):
    """The examples as written, and each flag's default after its help unless the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text or action.option_strings == []:
            return text
        return f"{text} (default: %(default)s)"


def groups(command: str) -> tuple:
    """The flag dataclasses of a command (config.py, engines.Sampling), in the order --help shows them."""
    from titletune.config import (
        AskArguments,
        EngineArguments,
        EvalArguments,
        RagArguments,
        RunArguments,
        ServeArguments,
    )
    from titletune.engines import Sampling

    return {
        "ask": (RunArguments, EngineArguments, Sampling, AskArguments, RagArguments),
        "chat": (RunArguments, EngineArguments, Sampling, AskArguments, RagArguments),
        "evaluate": (RunArguments, EngineArguments, Sampling, EvalArguments, RagArguments),
        "serve": (RunArguments, ServeArguments, RagArguments),
    }[command]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """`[command] [flags]` -> one namespace with `command`, every flag of that command (dashes or underscores) and,
    but for serve, `sampling` (a engines.Sampling). No command, or an old mode flag, reads as `ask` or that mode."""
    from transformers import HfArgumentParser

    from titletune.engines import Sampling

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview(), file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    command, argv = split_command(argv)
    dataclasses_ = groups(command)
    parser = HfArgumentParser(
        dataclasses_,
        prog=f"infer.py {command}",
        description=COMMANDS[command],
        formatter_class=_Help,
        epilog=_examples(command),
    )
    if command == "ask":
        parser.add_argument("question", help="The question, e.g. \"What is 'Girls Ballet Tutu Neon Pink'?\".")
    args = parser.parse_args(_switches(parser, argv))  # argparse's own message and exit 2 for an unknown flag
    args.command = command
    if command in ("ask", "chat"):  # --rag not given: the run decides (main)
        args.rag = args.rag if any(a == "--rag" or a.startswith("--rag=") for a in argv) else None
    if Sampling in dataclasses_:
        args.sampling = Sampling(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sampling)})
    return args


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    """The command named first, else the one an old mode flag (--interactive, --evaluate, --serve) turns on (a flag
    followed by a false word, or =false, turns nothing on), else ask. The old flags leave argv with their words."""
    if argv[0] in COMMANDS:
        return argv[0], argv[1:]
    rest, on = [], []
    skip = False
    for i, token in enumerate(argv):
        name, _, value = token.partition("=")
        if skip or name not in OLD_FLAGS:
            rest += [] if skip else [token]
            skip = False
            continue
        following = argv[i + 1].lower() if i + 1 < len(argv) and not value else ""
        skip = following in BOOL_WORDS
        word = (value or (following if skip else "true")).lower()
        if word in TRUE_WORDS:
            on.append(OLD_FLAGS[name])
    return (on[0] if on else "ask"), rest


def overview() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        __doc__.split("\n\n")[0],
        "",
        "usage: python infer.py [COMMAND] [flags]   (COMMAND --help: its flags)",
        "",
    ]
    lines += [f"  {c:<{width}}  {text}" for c, text in COMMANDS.items()]
    lines += [
        "",
        _examples(None),
        "",
        "--interactive, --evaluate and --serve still work, as chat, evaluate and serve.",
    ]
    return "\n".join(lines)


def _examples(command: str | None) -> str:
    lines = [line for line in __doc__.splitlines() if line.startswith("    python ")]
    if command:
        lines = [line for line in lines if f"infer.py {command}" in line or (command == "ask" and '.py "' in line)]
    return "examples:\n" + "\n".join(lines)


def _switches(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """HfArgumentParser lets a boolean flag take a value (--rag false), so `--rag "What is X?"` would read the
    question as that value and fail. A boolean flag not followed by a true/false word is a switch: it means true."""
    flags = {o for a in parser._actions if a.nargs == "?" and a.const is True for o in a.option_strings}
    out = []
    for i, token in enumerate(argv):
        out.append(token)
        if token in flags and (i + 1 == len(argv) or argv[i + 1].lower() not in BOOL_WORDS):
            out.append("true")
    return out


@cli
def main(args: argparse.Namespace) -> None:
    from titletune import engines, runs

    if args.command == "serve":
        return serve(args)
    check(args)
    run = runs.load_or_latest(args.run, args.outputs)
    if args.command == "evaluate":
        return evaluate(args, run)
    if args.rag is None:  # a run trained with catalogue entries in its prompts is asked with them too
        args.rag = float(run.section("data").get("rag_share") or 0) > 0
    if (args.rag_k is not None or args.rag_index) and not args.rag:
        raise UserError("--rag-k and --rag-index are for RAG answers: add --rag (this run does not turn it on).")
    systems = (args.only,) if args.only else engines.MODELS
    engine = engines.load_engine(run, args.engine, systems, _engine_options(args))
    if args.rag:
        from titletune import retrieval

        rag_index, args.rag_k = _rag_settings(args, run)
        args.index = retrieval.open_index(run, rag_index)
    if args.command == "ask":
        answer(engine, args.question, systems, args.sampling, args)
    else:
        loop(engine, systems, args.sampling, args)


def check(args: argparse.Namespace) -> None:
    """Every problem with the flags of ask, chat and evaluate at once, before any model loads."""
    problems = Problems()
    if args.command == "evaluate":
        if args.only:
            problems.add("evaluate compares base and tuned; leave out --only")
    else:  # evaluate's own checks are EvalSettings.check's, sampling and --rag-k included
        if args.command == "ask" and not args.question.strip():
            problems.add("the question is empty")
        problems.at_least("--rag-k", args.rag_k, 1)
        args.sampling.check(problems)
    if args.engine == "llamacpp" and args.sampling.num_beams != 1:
        problems.add("--num-beams works only with --engine transformers (llama.cpp has no beam search)")
    if args.engine == "llamacpp" and args.dtype != "auto":
        problems.add("--dtype is for --engine transformers (a GGUF computes in its own types)")
    problems.at_least("--threads", args.threads, 1)
    problems.done()


def answer(engine, question: str, systems: tuple[str, ...], sampling, args) -> None:
    from titletune import engines

    if args.rag:  # main set args.index and args.rag_k (_rag_settings)
        answers = engines.ask(engine, [question], systems, sampling, index=args.index, k=args.rag_k)
    else:
        answers = engines.ask(engine, [question], systems, sampling)
    names = [*engines.MODELS, *(f"{m}+rag" for m in engines.MODELS)]
    result = {s: (answers[s][0] if s in answers else None) for s in names}
    retrieved = answers["retrieved"][0] if "retrieved" in answers else None
    if args.json:
        out = {"question": question, **{s: a for s, a in result.items() if a is not None or s in engines.MODELS}}
        if retrieved is not None:
            out["retrieved"] = retrieved
        out.update(run=str(engine.run.dir), engine=engine.name)
        if engine.name == "llamacpp":
            out.update(gguf=_str(engine.paths.get("tuned")), base_gguf=_str(engine.paths.get("base")))
        out["sampling"] = dataclasses.asdict(sampling.for_run(engine.run))
        print(json.dumps(out, ensure_ascii=False), flush=True)
    else:
        shown = {s.upper(): a for s, a in result.items() if a is not None}
        print(render(question, shown, retrieved=retrieved), flush=True)


def render(
    question: str, answers: dict[str, str], width: int | None = None, retrieved: list[str] | None = None
) -> str:
    """The question (and the titles RAG retrieved), then the answers in columns sized to the terminal, or stacked
    when it is too narrow for columns of SIDE_BY_SIDE_MIN / 2 characters."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    lines = textwrap.wrap(f"Q: {question}", width)
    for rank, title in enumerate(retrieved or [], 1):
        lines += textwrap.wrap(f"retrieved {rank}: {title}", width, subsequent_indent="    ")
    if retrieved is not None and not retrieved:
        lines.append("retrieved: nothing (no word of the question is in the catalogue)")
    lines.append("")
    n = len(answers)
    if n >= 2 and width >= SIDE_BY_SIDE_MIN * n / 2:
        col = (width - 3 * (n - 1)) // n
        cols = [[name, "-" * min(col, len(name))] + _wrap(text, col) for name, text in answers.items()]
        depth = max(len(c) for c in cols)
        for row in zip(*(c + [""] * (depth - len(c)) for c in cols)):
            lines.append(" | ".join(f"{cell:<{col}}" for cell in row).rstrip())
    else:
        for name, text in answers.items():
            lines += [name, "-" * len(name)] + _wrap(text, width) + [""]
    return "\n".join(lines).rstrip() + "\n"


def _wrap(text: str, width: int) -> list[str]:
    out = []
    for para in (text or "(empty answer)").splitlines() or [""]:
        out += textwrap.wrap(para, width) or [""]
    return out


def loop(engine, systems, sampling, args) -> None:
    tty = sys.stdin.isatty()
    if tty:
        print("Ask about a product; Ctrl-D or Ctrl-C quits.", file=sys.stderr)
    try:
        while True:
            question = input("question> " if tty else "").strip()  # piped input: stdout stays answers only
            if question:
                try:
                    answer(engine, question, systems, sampling, args)
                except UserError as e:  # one bad question does not end the session
                    print(f"error: {e}", file=sys.stderr, flush=True)
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)


def evaluate(args: argparse.Namespace, run) -> None:
    from titletune import engines, lock, pipeline, reports
    from titletune import evaluate as ev

    rag_index, rag_k = _rag_settings(args, run)
    settings = ev.EvalSettings(
        samples=args.samples or run.section("script").get("eval_samples") or ev.EvalSettings.samples,
        seed=args.seed,
        data=args.data,
        rag_k=rag_k,
        rag_index=rag_index,
        sampling=args.sampling,
    )
    settings.check()
    again = f"evaluate again: python infer.py evaluate --run {shlex.quote(str(run.dir))}"
    with full_disk_is_user_error(run.dir, lambda: again), lock.held(run.dir):  # it writes report.* and the card
        engine = engines.load_engine(run, args.engine, engines.MODELS, _engine_options(args))
        scored = pipeline.finish(run, settings=settings, engine=engine)
    print(reports.summary(scored))
    print(f"wrote {run.dir / 'report.md'}, report.json, report.png")


def _rag_settings(args: argparse.Namespace, run) -> tuple[str | None, int]:
    """The file RAG searches (None: the run's training products) and k: the flags, else the run's, else RAG_K."""
    script = run.section("script") if run else {}
    return args.rag_index or script.get("rag_index"), args.rag_k or script.get("rag_k") or RAG_K


def serve(args: argparse.Namespace) -> None:
    """The playground page and an OpenAI-compatible API for the tuned and the base model, and the tuned one with
    catalogue entries (titletune/serve/), in this process (so stopping us stops it)."""
    from titletune import machine, runs

    try:
        from titletune.serve import app as server
        from titletune.serve import models as serving
    except ImportError as e:
        raise UserError(
            f"the server needs llama-cpp-python[server] ({e}); pip install 'llama-cpp-python[server]'"
        ) from None
    key = server.api_key(args.api_key)
    problems = Problems()
    problems.extend(server.check(args.host, args.port, key, args.max_queue, args.request_timeout))
    problems.at_least("--rag-k", args.rag_k, 1)
    problems.at_least("--threads", args.threads, 1)
    problems.done()
    if args.run or not args.gguf:
        run = runs.load_or_latest(args.run, args.outputs)
    else:  # a GGUF inside a run folder brings that run's prompts and products; elsewhere, the default prompts
        folder = Path(args.gguf).expanduser().parent
        run = runs.load(folder) if (folder / runs.CONFIG).is_file() else None
    sock = server.listen(args.host, args.port)  # before loading: a port in use is an error, not a false success
    # Opening the search index can take minutes the first time on a large --rag-index: its lines say so.
    for name in ("titletune.serve", "titletune.retrieval"):
        logging.getLogger(name).setLevel(logging.INFO)
    threads = args.threads or machine.llama_threads()
    rag_index, rag_k = _rag_settings(args, run)
    served = serving.load(
        run, args.gguf, args.base_gguf, threads, args.max_queue, args.request_timeout, rag_index=rag_index, rag_k=rag_k
    )
    app = server.create_app(served, key)
    print(server.banner(served, f"http://{_url_host(args.host)}:{args.port}", key), flush=True)
    server.run(app, served, sock)


def _engine_options(args: argparse.Namespace):
    """engines.load_engine's options (a engines.EngineOptions), from the flags."""
    from titletune.engines import EngineOptions

    return EngineOptions(
        use_merged=args.use_merged,
        gguf=args.gguf,
        base_gguf=args.base_gguf,
        threads=args.threads,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _str(path) -> str | None:
    return str(path) if path else None


if __name__ == "__main__":
    from titletune import logs
    from titletune.base_models import disable_telemetry

    disable_telemetry()  # before transformers and huggingface_hub are imported
    logs.setup(logging.WARNING, plain=True)  # infer.py prints its answers; the log keeps to warnings
    main(cli(parse_args)())  # --help into `| head`, a bad flag or Ctrl-C during the imports: no traceback
