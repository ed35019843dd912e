"""The run's model card: README.md in the run folder, adapter/ and merged/, every number read from the run's files.

On the Hugging Face Hub a model's README.md is its card: YAML metadata (base_model, library_name, license, tags,
datasets), then Markdown. `write` renders it from run_config.yaml, data/stats.json, train_log.jsonl, report.json,
export.json and adapter/adapter_config.json, so it never says more than those files do; a section whose file is not
there yet says so in one line. train.py writes it when a run ends, and export_run and evaluate_run after they change
export.json or report.json, so the card always describes the files beside it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from titletune import base_models, capacity, card_usage, files, reports
from titletune.errors import UserError
from titletune.runs import Run, read_json

log = logging.getLogger(__name__)

NAME = "README.md"
# The catalogue file of LF-AmazonTitles-1.3M is trn.json (data/README.md); any other file is named as it is.
REAL_FILES = {"trn.json": "LF-AmazonTitles-1.3M", "trn.json.gz": "LF-AmazonTitles-1.3M"}
LIBRARY = {"run": "transformers", "adapter": "peft", "merged": "transformers"}


def write(run: Run) -> list[Path]:
    """README.md in the run folder, adapter/ and merged/ (those that exist), each written atomically."""
    src = sources(run)
    body = render_body(run, src)
    written = []
    for kind, folder in (("run", run.dir), ("adapter", run.adapter), ("merged", run.merged)):
        if folder.is_dir():
            head = metadata(run, src, LIBRARY[kind], gguf=kind == "run").to_yaml()
            written.append(files.write_atomic(folder / NAME, f"---\n{head}\n---\n\n{body}"))
    log.info("card: %s", ", ".join(str(p.relative_to(run.dir)) for p in written))
    return written


def sources(run: Run) -> dict:
    """The run's files the card is made of, None (or []) for each one that is missing or unreadable; and its GGUF
    files."""
    log_path = run.dir / "train_log.jsonl"
    records = []
    if log_path.is_file():
        for line in log_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut short by a kill: the others still count
                continue
    src = {
        "stats": read_json(run.data / "stats.json"),
        "log": records,
        "report": read_json(run.dir / "report.json"),
        "export": read_json(run.dir / "export.json"),
        "lora": read_json(run.adapter / "adapter_config.json"),
        "capacity": read_json(run.dir / capacity.FILE),
    }
    src["ggufs"] = _ggufs(run, src["export"])
    return src


# ------------------------------------------------------------------------------------------------------- metadata


def metadata(run: Run, src: dict, library_name: str, gguf: bool = True):
    """The card's YAML block, as huggingface_hub's ModelCardData (fields it leaves None are not written). `gguf`:
    the folder holds the GGUF files (the run folder), so the tag applies when there are any."""
    from huggingface_hub import ModelCardData

    tags = ["titletune", "lora", *(["qlora"] if run.section("model").get("load_in_4bit") else []), "sft", "trl"]
    if gguf and src["ggufs"]:
        tags.append("gguf")
    source = data_file(run, src)
    return ModelCardData(
        base_model=base_id(run),
        library_name=library_name,
        license=base_license(run),
        pipeline_tag="text-generation",
        tags=tags,
        datasets=[REAL_FILES.get(source, source)] if source else None,
    )


def base_id(run: Run) -> str | None:
    """The base model's hub id: SmolLM2-135M-Instruct's for the embedded model, the id a run loaded from the hub;
    None for a local folder, which has no id the hub would know."""
    if run.is_embedded:
        return base_models.EMBEDDED_HUB_ID
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = str(run.config["base_model"])
    if Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def base_license(run: Run) -> str | None:
    """The base model's license, read only from files on this machine: the embedded model's is known; a local
    folder's or a cached hub model's README.md says it. None when neither is there (no network is asked)."""
    if run.is_embedded:
        return base_models.EMBEDDED_LICENSE
    from huggingface_hub import ModelCard, try_to_load_from_cache

    name = str(run.config["base_model"])
    readme = Path(name).expanduser() / NAME
    if not readme.is_file() and base_id(run):
        cached = try_to_load_from_cache(name, NAME, revision=run.section("model").get("model_revision"))
        readme = Path(cached) if isinstance(cached, str) else readme
    try:
        value = ModelCard.load(readme, ignore_metadata_errors=True).data.license if readme.is_file() else None
    except (OSError, ValueError):
        return None
    return value if isinstance(value, str) else None


def data_file(run: Run, src: dict) -> str | None:
    """The name of the file the run's products came from, as stats.json (else run_config.yaml) records it."""
    path = ((src["stats"] or {}).get("input") or {}).get("path") or run.section("data").get("data")
    return Path(path).name if path else None


# ----------------------------------------------------------------------------------------------------------- body


def render_body(run: Run, src: dict) -> str:
    base = base_id(run) or _local(str(run.config["base_model"]))  # what from_pretrained loads, in "How to use"
    sections = [_intro(run, src), _use(run, src), _data(run, src), _training(run, src), _results(run, src)]
    sections += [_files(run, src), card_usage.how_to(run, src, base)]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def _intro(run: Run, src: dict) -> list[str]:
    kind = "QLoRA (4-bit base)" if run.section("model").get("load_in_4bit") else "LoRA"
    return [
        f"# {run.dir.name}",
        "",
        f"A {kind} fine-tune of {_base_name(run)} that answers questions about catalogue products with their "
        f"catalogue descriptions, trained with titletune on `{data_file(run, src) or 'an unrecorded file'}`.",
        "",
        "titletune writes this card from the run's own files (run_config.yaml, data/stats.json, train_log.jsonl, "
        "report.json, export.json, adapter/adapter_config.json) when training ends, and again after every export and "
        "evaluation. The same text is in the run folder, adapter/ and merged/; the files it lists are relative to the "
        "run folder.",
    ]


def _use(run: Run, src: dict) -> list[str]:
    lines = [
        "## Intended use and limits",
        "",
        'Trained to answer a question about a product of its catalogue ("What is <title>?", in the prompt set\'s '
        "phrasings, under its system prompt) with that product's catalogue description. What it can give back is "
        "what it learned of the products it was trained on (how much: the seen products below); for a product it "
        "never saw it writes a fluent description that is invented. Do not take an answer as a fact about a "
        "product, or ground it with catalogue entries (RAG: `python infer.py ask --rag`). The base model's own limits "
        "and license apply.",
        "",
    ]
    report = src["report"]
    if not report:
        return [
            *lines,
            f"No evaluation yet (report.json): `python infer.py evaluate --run {card_usage.here(run)}` scores it.",
        ]
    measured = []
    for pop, what in (("seen", "on trained products"), ("heldout", "on held-out products")):
        if pop in report:
            tuned, base = report[pop]["tuned"]["rougeL"], report[pop]["base"]["rougeL"]
            measured.append(
                f"{what}, ROUGE-L F1 {card_usage.mean(tuned)} against the base model's {card_usage.mean(base)} "
                f"(n = {report['counts'][pop]})"
            )
    return [*lines, "Measured (report.json, tuned model): " + "; ".join(measured) + "."]


def _data(run: Run, src: dict) -> list[str]:
    stats = src["stats"]
    lines = ["## Data", ""]
    if not stats:
        lines.append("No data statistics (data/stats.json is missing).")
    else:
        source, kept, args = stats["input"], stats["kept"], stats.get("args") or {}
        name = Path(source["path"]).name
        real = f", the catalogue file of {REAL_FILES[name]}" if name in REAL_FILES else ""
        lines += [
            f"Source: `{name}`{real} ({source['bytes']:,} bytes), fields `{args.get('title_field')}` and "
            f"`{args.get('content_field')}`; seed {stats['seed']}, max_samples {args.get('max_samples')}, "
            f"descriptions cut at {args.get('max_content_chars')} characters ({stats['truncated']:,} were).",
            "",
            "| products | count |",
            "|---|---:|",
            f"| rows read | {stats['rows_read']:,} |",
            *(f"| kept: {split} | {kept[split]:,} |" for split in ("train", "val", "test") if split in kept),
            *(
                [f"| kept: read only (RAG rows only, `rag_read`) | {kept['rag_read']:,} |"]
                if kept.get("rag_read")
                else []
            ),
            *([f"| kept: total | {kept['total']:,} |"] if "total" in kept else []),
            f"| dropped | {stats['dropped_total']:,} |",
            "",
            "| dropped because | rows |",
            "|---|---:|",
            *(f"| {reason.replace('_', ' ')} | {n:,} |" for reason, n in stats["dropped"].items()),
        ]
    try:
        ps = run.prompts
    except UserError:
        return [*lines, "", "No prompt set in the run folder (prompts/)."]
    folder = Path(str(run.section("data").get("prompts") or "prompts")).name
    return [
        *lines,
        "",
        f"Prompt set `{folder}` (copied into prompts/): {len(ps.questions)} question phrasings in training, "
        f'{len(ps.held_out)} more kept out of it for the evaluation; system prompt: "{ps.system}"',
    ]


def _training(run: Run, src: dict) -> list[str]:
    t, m, d = run.section("training"), run.section("model"), run.section("data")
    lora = src["lora"] or {}
    records = src["log"]
    losses = [r for r in records if "loss" in r]
    seconds = sum(r["train_runtime"] for r in records if "train_runtime" in r)  # one record per session (resumes)
    tokens = next((r["num_tokens"] for r in reversed(records) if "num_tokens" in r), None)
    evals = [r for r in records if "eval_loss" in r]
    mean = [r for r in records if "train_loss" in r]
    use_cpu = t.get("use_cpu")
    device = "not recorded" if use_cpu is None else "CPU" if use_cpu else "CUDA"
    precision = "bf16" if t.get("bf16") else "fp16" if t.get("fp16") else "fp32"
    quantized = "; base in 4-bit (QLoRA, bitsandbytes)" if m.get("load_in_4bit") else ""
    per_device, accumulation = t.get("per_device_train_batch_size"), t.get("gradient_accumulation_steps")
    batch = per_device * accumulation if per_device and accumulation else None
    targets = lora.get("target_modules") or m.get("lora_target_modules") or []
    rows = [
        ("backend", run.config.get("backend")),
        ("device, precision", f"{device}, {precision}{quantized}"),
        ("LoRA r / alpha / dropout", f"{lora.get('r')} / {lora.get('lora_alpha')} / {lora.get('lora_dropout')}"),
        ("LoRA targets", ", ".join(sorted(targets)) or None),
        (
            "learning rate",
            f"{t['learning_rate']:g} ({t.get('lr_scheduler_type')} schedule, warmup {t.get('warmup_steps') or 0:g})"
            if t.get("learning_rate")
            else None,
        ),
        ("steps", losses[-1]["step"] if losses else None),
        ("epochs", f"{losses[-1]['epoch']:.4g}" if losses and losses[-1].get("epoch") is not None else None),
        ("passes (phrasings per product per epoch)", d.get("passes")),
        (
            "effective batch",
            f"{batch} ({per_device} per device x {accumulation} accumulation, per process)" if batch else None,
        ),
        ("max_length (tokens)", run.config.get("max_length")),
        ("training time", f"{seconds:.1f} s" if seconds else None),
        ("tokens/s (non-pad tokens trained)", f"{tokens / seconds:.1f}" if tokens and seconds else None),
        ("final train loss", f"{losses[-1]['loss']:.4f} at step {losses[-1]['step']}" if losses else None),
        ("mean train loss over the run", f"{mean[-1]['train_loss']:.4f}" if mean else None),
        ("final eval loss", f"{evals[-1]['eval_loss']:.4f} at step {evals[-1]['step']}" if evals else None),
        *_capacity(src["capacity"]),
    ]
    lines = ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {'-' if value is None else value} |" for name, value in rows]
    if not records:
        lines += ["", "No training log (train_log.jsonl is missing)."]
    return lines


def _capacity(c: dict | None) -> list[tuple[str, object]]:
    """capacity.json's rows of the training table: what the adapter was asked to hold, and the recall the
    provisional capacity law predicted for it before training."""
    c = c or {}
    known = all(k in c for k in reports.CAPACITY_KEYS)
    return [
        ("trainable parameters", f"{c['trainable']:,}" if known else None),
        (
            "catalogue (train products x mean answer tokens)",
            f"{c['products']:,} x {c['answer_tokens']:.1f} = {round(c['products'] * c['answer_tokens']):,} tokens"
            if known
            else None,
        ),
        ("capacity ratio (answer tokens per trainable parameter)", f"{c['ratio']:.3g}" if known else None),
        (
            "predicted seen ROUGE-L (provisional capacity law, before training)",
            f"{c['recall']:.2f} at {c['views']:g} views" if known else None,
        ),
    ]


def _results(run: Run, src: dict) -> list[str]:
    report, exported = src["report"], src["export"]
    lines = ["## Results", ""]
    if not report:
        lines.append(
            f"No evaluation yet (report.json): `python infer.py evaluate --run {card_usage.here(run)}` writes it."
        )
    else:
        s = report["settings"]
        d = s["sampling"]
        lines += [
            f"From report.json (report.md has examples and the plot): engine {report['engine']}, data: "
            f"{report['data']}, seed {s['seed']}, {reports.decoding(d)} decoding of at most {d['max_new_tokens']} "
            f"tokens; RAG puts the top {s['rag_k']} entries of {report['index']} in the prompt. Each cell is the mean "
            "[95% bootstrap interval]; ROUGE 0-1, BLEU 0-100.",
        ]
        for pop, title in (
            ("seen", "Seen products (trained on)"),
            ("heldout", "Held-out products (never trained on)"),
        ):
            lines += ["", f"### {title}", ""]
            if pop not in report:
                lines.append("No products in this population.")
                continue
            lines += [f"Products scored: {report['counts'][pop]}.", "", reports.table(report, pop), ""]
            lines += reports.verdicts(report, pop)
            if pop == "seen" and report.get("seen_new_phrasing"):
                lines += ["", *reports.new_phrasing_lines(report)]
    lines += ["", "### Export fidelity", ""]
    table = reports.fidelity_table(exported["files"], exported.get("fidelity_merged")) if exported else []
    if table:
        lines += table
    else:
        lines.append("No GGUF export (export.json)." if not exported else "export.json has no fidelity numbers.")
    return lines


def _files(run: Run, src: dict) -> list[str]:
    rows = [
        (p, p.stat().st_size, files.sha256(p))
        for folder in (run.adapter, run.merged)
        for p in sorted(folder.glob("*.safetensors"))
    ]
    rows += [(run.dir / e["name"], e["bytes"], e["sha256"]) for e in src["ggufs"]]
    modelfile = run.dir / "Modelfile"
    if modelfile.is_file():
        rows.append((modelfile, modelfile.stat().st_size, files.sha256(modelfile)))
    lines = ["## Files", "", "| file | bytes | sha256 |", "|---|---:|---|"]
    lines += [f"| {p.relative_to(run.dir)} | {size:,} | {digest} |" for p, size, digest in rows]
    return lines


def _ggufs(run: Run, exported: dict | None) -> list[dict]:
    """The run's GGUF files: name, bytes, sha256. export.json's hashes where the file is the one it describes (same
    size); any other *.gguf in the folder is hashed here."""
    listed = {e["name"]: e for e in (exported or {}).get("files", []) if "sha256" in e}
    out = []
    for path in sorted(run.dir.glob("*.gguf")):
        size = path.stat().st_size
        entry = listed.get(path.name)
        digest = entry["sha256"] if entry and entry.get("bytes") == size else files.sha256(path)
        out.append({"name": path.name, "bytes": size, "sha256": digest})
    return out


def _local(path: str) -> str:
    """A local folder by its name only: path/to/<name>."""
    return f"path/to/{Path(path).name}"


def _base_name(run: Run) -> str:
    name = base_id(run)
    return (
        f"[{name}](https://huggingface.co/{name})"
        if name
        else f"the base model in `{_local(run.config['base_model'])}`"
    )
