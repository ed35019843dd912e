"""Ask the base and the fine-tuned model the same question, side by side; evaluate a run; or serve both models.

The most recent run in outputs/ is used unless --run says otherwise. Questions go through the run's own
prompts/ and the model's chat template, exactly as in training.

    python infer.py "What is 'Girls Ballet Tutu Neon Pink'?"                    # base | tuned, latest run
    python infer.py "Tell me about Hiking Socks." --run outputs/<run> --json   # one JSON object
    python infer.py --interactive --only tuned                                 # a prompt loop; Ctrl-D quits
    python infer.py --rag "What is 'Girls Ballet Tutu Neon Pink'?"             # + tuned with catalogue entries
    python infer.py --rag --rag-index data/trn.json "Tell me about ..."        # search the whole catalogue
    python infer.py "What is ...?" --engine llamacpp                           # the GGUF the run ships
    python infer.py "What is ...?" --engine llamacpp --gguf outputs/<run>/model.q8_0.gguf --base-gguf base.gguf
    python infer.py --evaluate --samples 20                                    # report.{json,md,png} in the run
    python infer.py --evaluate --data data/trn.json --samples 50                 # products of any trn file
    python infer.py --serve                                # playground at http://127.0.0.1:8000/, API at /v1
    python infer.py --serve --gguf outputs/<run>/model.q8_0.gguf --port 8001       # another file as "tuned"
    python infer.py --serve --rag-index data/trn.json     # "tuned+rag" searches the whole catalogue
    python infer.py --serve --host 0.0.0.0     # other machines too: needs $TITLETUNE_API_KEY (or --api-key)

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
from titletune.errors import UserError, cli, full_disk_is_user_error

EXAMPLES = "examples:\n" + "\n".join(line for line in __doc__.splitlines() if line.startswith("    python "))
SIDE_BY_SIDE_MIN = 80  # narrower terminals get stacked blocks: two 38-column answers are hard to read


class _Help(argparse.RawDescriptionHelpFormatter):
    """The examples as written, and each flag's default after its help unless the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text or action.option_strings == []:
            return text
        return f"{text} (default: %(default)s)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every flag from the dataclasses (config.InferArguments, config.ModeArguments, generate.Sampling), with dashes or
    underscores; one namespace, plus `sampling` (a generate.Sampling)."""
    from transformers import HfArgumentParser

    from titletune.config import InferArguments, ModeArguments
    from titletune.generate import Sampling

    groups = (InferArguments, Sampling, ModeArguments)
    parser = HfArgumentParser(groups, description=__doc__.split("\n\n")[0], formatter_class=_Help, epilog=EXAMPLES)
    parser.add_argument(
        "question", nargs="?", help="The question to ask, e.g. \"What is 'Girls Ballet Tutu Neon Pink'?\"."
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(_switches(parser, argv))  # argparse's own message and exit 2 for an unknown flag
    args.sampling = Sampling(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sampling)})
    args.rag_given = any(a == "--rag" or a.startswith("--rag=") for a in argv)  # else the run decides (main)
    return args


def _switches(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """HfArgumentParser lets a boolean flag take a value (--rag false), so `--rag "What is X?"` would read the
    question as that value and fail. A boolean flag not followed by a true/false word is a switch: it means true."""
    words = {"yes", "no", "true", "false", "t", "f", "y", "n", "1", "0"}
    flags = {o for a in parser._actions if a.nargs == "?" and a.const is True for o in a.option_strings}
    out = []
    for i, token in enumerate(argv):
        out.append(token)
        if token in flags and (i + 1 == len(argv) or argv[i + 1].lower() not in words):
            out.append("true")
    return out


@cli
def main(args: argparse.Namespace) -> None:
    from titletune import generate, runs

    if args.serve:
        return serve(args)
    check(args)
    run = runs.load_or_latest(args.run, args.outputs)
    if args.evaluate:
        return evaluate(args, run)
    args.sampling.check()
    if not args.rag_given:  # a run trained with catalogue entries in its prompts is asked with them too
        args.rag = float(run.section("data").get("rag_share") or 0) > 0
    systems = (args.only,) if args.only else generate.SYSTEMS
    engine = generate.load_engine(run, args.engine, systems, *_engine_options(args))
    if args.rag:
        from titletune import retrieval

        rag_index, args.rag_k = _rag_settings(args, run)
        args.index = retrieval.open_index(run, rag_index)
    if args.question:
        answer(engine, args.question, systems, args.sampling, args)
    if args.interactive:
        loop(engine, systems, args.sampling, args)


def check(args: argparse.Namespace) -> None:
    """Every problem with the flags at once, before any model loads."""
    problems = []
    if not (args.question or args.interactive or args.evaluate):
        problems.append("give a question, or --interactive, --evaluate or --serve")
    if args.data and not args.evaluate:
        problems.append("--data needs --evaluate")
    if args.evaluate and args.samples is not None and args.samples < 1:
        problems.append(f"--samples must be >= 1, got {args.samples}")
    if args.evaluate and (args.question or args.interactive):
        problems.append("--evaluate takes no question and no --interactive")
    if args.rag and args.evaluate:
        problems.append("--rag is for questions; --evaluate always scores base + RAG and tuned + RAG")
    if args.rag_k is not None and args.rag_k < 1:
        problems.append(f"--rag-k must be >= 1, got {args.rag_k}")
    if (args.rag_k is not None or args.rag_index) and not (args.rag or args.evaluate):
        problems.append("--rag-k and --rag-index need --rag, --evaluate or --serve")
    if args.engine == "llamacpp" and args.sampling.num_beams != 1:
        problems.append("--num-beams works only with --engine transformers (llama.cpp has no beam search)")
    if args.engine == "llamacpp" and args.dtype != "auto":
        problems.append("--dtype is for --engine transformers (a GGUF computes in its own types)")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads must be >= 1, got {args.threads}")
    if problems:
        raise UserError("; ".join(problems) + ".")


def answer(engine, question: str, systems: tuple[str, ...], sampling, args) -> None:
    from titletune import generate

    index = getattr(args, "index", None) if args.rag else None
    answers = generate.ask(engine, [question], systems, sampling, index=index, k=args.rag_k or RAG_K)
    names = [*generate.SYSTEMS, *(f"{m}+rag" for m in generate.SYSTEMS)]
    result = {s: (answers[s][0] if s in answers else None) for s in names}
    retrieved = answers["retrieved"][0] if "retrieved" in answers else None
    if args.json:
        out = {"question": question, **{s: a for s, a in result.items() if a is not None or s in generate.SYSTEMS}}
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
    from titletune import evaluate as ev
    from titletune import generate, lock, pipeline, reports

    if args.only:
        raise UserError("--evaluate compares base and tuned; leave out --only.")
    script = run.section("script")
    settings = ev.EvalSettings(
        samples=args.samples or script.get("eval_samples") or ev.EvalSettings.samples,
        seed=args.seed,
        data=args.data,
        rag_k=args.rag_k or script.get("rag_k") or RAG_K,
        rag_index=args.rag_index or script.get("rag_index"),
        sampling=args.sampling,
    )
    settings.check()
    again = f"evaluate again: python infer.py --run {shlex.quote(str(run.dir))} --evaluate"
    with full_disk_is_user_error(run.dir, lambda: again), lock.held(run.dir):  # it writes report.* and the card
        engine = generate.load_engine(run, args.engine, generate.SYSTEMS, *_engine_options(args))
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
    problems = server.check(args.host, args.port, key, args.max_queue, args.request_timeout)
    if args.question or args.interactive or args.evaluate:
        problems.insert(0, "--serve takes no question, --interactive or --evaluate")
    if args.rag_k is not None and args.rag_k < 1:
        problems.append(f"--rag-k must be >= 1, got {args.rag_k}")
    if problems:
        raise UserError("; ".join(problems) + ".")
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


def _engine_options(args: argparse.Namespace) -> tuple:
    """generate.load_engine's arguments after the systems, from the flags."""
    return args.use_merged, args.gguf, args.base_gguf, args.threads, args.dtype, args.trust_remote_code


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _str(path) -> str | None:
    return str(path) if path else None


if __name__ == "__main__":
    from titletune import logs
    from titletune.models import disable_telemetry

    disable_telemetry()  # before transformers and huggingface_hub are imported
    logs.setup(logging.WARNING, plain=True)  # infer.py prints its answers; the log keeps to warnings
    main(parse_args())
