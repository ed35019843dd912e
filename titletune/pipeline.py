"""The steps after training, in one place for train.py and infer.py: the GGUF export, the evaluation, the reports
that follow them and the model card, written once, last.

The stages (export.py, evaluate.py) make files and numbers; they never render the card or rewrite reports. `finish`
runs the steps a command asked for, in order, and then writes what describes them:

    export.export_run      merged/ when missing, GGUFs, Modelfile, export.json
    evaluate.evaluate_run  the six systems on two populations -> the report (a dict)
    reports.write_reports  report.json, report.md (with the export's fidelity table), report.png
    card.write             README.md in the run folder, adapter/ and merged/, from every file above
"""

from __future__ import annotations

import json

from titletune import card, evaluate, export, reports
from titletune.runs import Run


def finish(
    run: Run,
    gguf_types: list[str] = (),
    export_args=None,
    question: str | None = None,
    settings: evaluate.EvalSettings | None = None,
    engine=None,
    trust_remote_code: bool = False,
) -> dict | None:
    """Export when `export_args` is given (merged/ first when missing, then `gguf_types`, asked `question`), evaluate
    when `settings` is given (with `engine`: a loaded engine or its name), then the reports and the model card.
    Returns the evaluation's report, or None without one. trust_remote_code: the command's own flag, for a merge."""
    if export_args is not None:
        export.export_run(run, list(gguf_types), export_args, question, trust_remote_code)
    scored = None
    if settings is not None:
        scored = evaluate.evaluate_run(run, settings, engine=engine)
    elif gguf_types and (run.dir / "report.json").is_file():  # a new export: the fidelity table follows its files
        scored = json.loads((run.dir / "report.json").read_text())
    if scored is not None:
        reports.write_reports(run.dir, scored)
    card.write(run)  # last, so it describes every file the command ends with
    return scored if settings is not None else None
