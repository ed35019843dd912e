"""The train set of a run: its prepared split files read as memory-mapped Arrow datasets of prompt/completion rows,
each train product in --passes phrasings, with RAG-aware rows (ragrows.py) when --rag-share asks for them, and the
special tokens of the model's own tokenizer made plain text (specials.py). training.fit trains on what this returns.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from titletune.errors import UserError

log = logging.getLogger(__name__)


def load_datasets(
    run_dir: Path,
    prompt_set=None,
    passes: int = 1,
    seed: int = 42,
    rag_share: float = 0.0,
    rag_distractors: float = 0.0,
) -> tuple:
    """data/train.jsonl and data/val.jsonl (None when empty) as Arrow datasets, prompt and completion columns only.
    The train split is read `passes` times: pass i asks every product in its i-th phrasing (prompts.pick_question),
    so that a product is learned from several questions, not from one repeated (bench/README.md: the study). With
    rag_share, each pass adds RAG-aware rows for a seeded share of the products (rag_rows, ragrows.py). The Trainer's
    sampler then shuffles all the rows together. The split files keep one row per product.

    load_dataset, not Dataset.from_list: the rows are memory-mapped Arrow instead of Python objects (1.3M products
    would take GBs in every process), and SFTTrainer's Dataset.map tokenisation is cached on disk beside them, in
    <run>/data/cache, so a resumed run and every rank after the first reuse it (TRL maps on the main process first).
    Deleting the run deletes its cache.
    """
    from datasets import concatenate_datasets

    from titletune import prompts as prompts_lib

    cache = str(Path(run_dir) / "data" / "cache")
    loaded = _splits(run_dir, cache)
    if passes > 1:
        prompt_set = prompt_set or prompts_lib.load(Path(run_dir) / "prompts")
        loaded["train"] = _phrasings(loaded["train"], prompt_set, passes, seed)
    loaded = {split: ds.select_columns(["prompt", "completion"]) for split, ds in loaded.items()}
    if rag_share > 0:
        prompt_set = prompt_set or prompts_lib.load(Path(run_dir) / "prompts")
        extra, read = rag_rows(run_dir, prompt_set, passes, seed, rag_share, rag_distractors, cache)
        log.info(
            "RAG-aware training: %d rows with catalogue entries (--rag-share %g), %d of them for the %d read-only "
            "products (--rag-read)",
            len(extra), rag_share, read * passes, read,
        )  # fmt: skip
        if len(extra):
            loaded["train"] = concatenate_datasets([loaded["train"], extra.cast(loaded["train"].features)])
    return loaded["train"], loaded.get("val")


def _splits(run_dir: Path, cache: str) -> dict:
    """data/train.jsonl and data/val.jsonl as Arrow datasets by split, an empty file left out; a missing file, or a
    train split with no products, is a UserError that says how to prepare the data."""
    from datasets import load_dataset

    files = {split: Path(run_dir) / "data" / f"{split}.jsonl" for split in ("train", "val")}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise UserError(
            f"{', '.join(missing)} missing; prepare the data first: python train.py --prepare-only "
            f"--output-dir {run_dir}"
        )
    loaded = {
        split: load_dataset("json", data_files=str(path), split="train", cache_dir=cache)
        for split, path in files.items()
        if path.stat().st_size > 0
    }
    if "train" not in loaded:
        raise UserError(f"{files['train']} holds no products; prepare the data again with more --max-samples.")
    return loaded


def _phrasings(first, prompt_set, passes: int, seed: int):
    """The train split read `passes` times: pass 0 is the split file's own rows, pass i asks every product its i-th
    phrasing (prompts.render with turn i; the completion is the same)."""
    from datasets import concatenate_datasets

    from titletune import prompts as prompts_lib

    def ask(turn):
        def row(r):
            rendered = prompts_lib.render(prompt_set, r["title"], r["content"], key=r["id"], seed=seed, turn=turn)
            return {"prompt": rendered["prompt"]}

        return row

    copies = [first] + [first.map(ask(turn), desc=f"pass {turn + 1} phrasings") for turn in range(1, passes)]
    return concatenate_datasets(copies)


def rag_rows(run_dir: Path, prompt_set, passes: int, seed: int, share: float, distractors: float, cache: str):
    """The RAG-aware rows of every pass (ragrows.py), from data/train.jsonl and the neighbours data preparation
    wrote beside it (data/rag_train.jsonl, line for line), and the read-only products' rows (data/rag_read.jsonl).
    Returns the rows and how many read-only products they hold."""
    from datasets import concatenate_datasets, load_dataset

    from titletune import ragrows

    folder = Path(run_dir) / "data"
    path = folder / ragrows.FILE
    if not path.is_file() or not path.stat().st_size:
        raise UserError(
            f"{path} is missing: this run's data was prepared without --rag-share. Prepare it again with the flag "
            f"(python train.py --rag-share {share} --output-dir <new run>)."
        )
    products = load_dataset("json", data_files=str(folder / "train.jsonl"), split="train", cache_dir=cache)
    near = load_dataset("json", data_files=str(path), split="train", cache_dir=cache)
    if len(near) != len(products) or near[0]["id"] != str(products[0]["id"]):
        raise UserError(f"{path} does not match {folder / 'train.jsonl'}; prepare the data again (a new run).")
    joined = concatenate_datasets(
        [products.select_columns(["id", "title", "content"]), near.select_columns(["neighbours"])], axis=1
    )

    def for_pass(turn: int):
        def rows(batch: dict) -> dict:
            out: dict = {"prompt": [], "completion": []}
            for pid, title, content, neighbours in zip(
                batch["id"], batch["title"], batch["content"], batch["neighbours"], strict=True
            ):
                product = {"id": pid, "title": title, "content": content}
                made = ragrows.row(prompt_set, product, neighbours or [], seed, turn, share, distractors)
                if made is not None:
                    out["prompt"].append(made["prompt"])
                    out["completion"].append(made["completion"])
            return out

        return rows

    passes_rows = [
        joined.map(for_pass(turn), batched=True, remove_columns=joined.column_names, desc=f"pass {turn + 1} RAG rows")
        for turn in range(passes)
    ]
    read_path, read = folder / ragrows.READ_FILE, []
    if read_path.is_file() and read_path.stat().st_size:
        read = load_dataset("json", data_files=str(read_path), split="train", cache_dir=cache)

        def read_pass(turn: int):
            def rows(r: dict) -> dict:
                product = {"id": r["id"], "title": r["title"], "content": r["content"]}
                return ragrows.read_row(prompt_set, product, r["neighbours"] or [], seed, turn)

            return rows

        passes_rows += [
            read.map(read_pass(turn), remove_columns=read.column_names, desc=f"pass {turn + 1} read rows")
            for turn in range(passes)
        ]
    return concatenate_datasets(passes_rows), len(read)


def plain_rows(tokenizer, run_dir: Path, train_ds, eval_ds) -> tuple:
    """The datasets with every special token of the model's own tokenizer made plain text in the messages
    (specials.py). Data preparation made the common families' markers plain already, without a tokenizer; a product
    that holds another special token of this one is rare, so the split files are searched first (orjson, seconds for
    the whole catalogue) and the rows are mapped only when one does."""
    import orjson

    from titletune import specials

    guard = specials.from_tokenizer(tokenizer)
    found = 0
    for name in ("train.jsonl", "val.jsonl", "rag_read.jsonl"):  # rag_read: RAG-aware training's read products
        path = Path(run_dir) / "data" / name
        with open(path, "rb") if path.is_file() else contextlib.nullcontext(()) as lines:
            for line in lines:
                row = orjson.loads(line) if line.strip() else {}
                texts = [m["content"] for m in row.get("prompt", []) + row.get("completion", [])]
                texts += [row[k] for k in ("title", "content") if "prompt" not in row and k in row]
                found += any(guard.search(text) for text in texts)
    if not found:
        return train_ds, eval_ds
    log.info("%d products hold special tokens of the model's tokenizer: made plain text", found)

    def plain(row: dict) -> dict:
        return {key: guard.messages(row[key], check_all=False) for key in ("prompt", "completion")}

    return tuple(None if ds is None else ds.map(plain, desc="special tokens made plain") for ds in (train_ds, eval_ds))
