"""The library's layering, read from the code's own imports with ast: no module imports one in a layer above its own,
and no import circle anywhere (within a layer either). README.md, "Layout", draws the same layers.

Imports inside functions count: a deferred import is still a dependency, and hiding a circle in a function is how
the card, the evaluation and the export once called each other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "titletune"

# Bottom up. A module may import any module of its own layer or one below; a package (backends, serve) is one entry.
LAYERS = {
    "ground": ("errors", "logs", "files", "text", "metrics", "llamacpp", "teacher"),
    "settings": ("config", "machine", "lock", "prompts", "reading", "capacity", "base_models", "ollama", "specials"),
    "data": ("chunks", "selection", "indexing", "retrieval", "ragrows", "prepare", "eda", "trainset"),
    "runs": ("claims", "runs", "resume", "backends"),
    "stages": (
        "sampling",
        "hf_engine",
        "engines",
        "training",
        "llamacpp_child",
        "fidelity",
        "roundtrip",
        "converter",
        "export",
        "evaluate",
        "serve",
    ),
    "outputs": ("reports", "card_usage", "card", "preflight"),
    "steps": ("pipeline",),
}
LAYER = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}


def modules() -> dict[str, Path]:
    """titletune's modules by dotted name below the package ("serve.app", "backends"), the package itself left out."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The titletune modules a file imports, anywhere in it (`from titletune import x`, `from titletune.x import y`,
    `import titletune.x`), as names of `known`."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("titletune"):
            base = node.module.removeprefix("titletune").lstrip(".")
            names = [f"{base}.{a.name}".lstrip(".") for a in node.names]
            out |= {n for n in [base, *names] if n in known}
        elif isinstance(node, ast.Import):
            out |= {
                a.name.removeprefix("titletune.") for a in node.names if a.name.removeprefix("titletune.") in known
            }
    return out


def layer(module: str) -> int:
    return LAYER[module.split(".")[0]]


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def test_every_module_has_a_layer():
    unplaced = sorted({m.split(".")[0] for m in modules()} - set(LAYER))
    assert not unplaced, f"place these modules in LAYERS (and README.md's Layout): {unplaced}"


def test_no_module_imports_a_layer_above_its_own():
    upward = [
        f"{m} ({_name(layer(m))}) imports {d} ({_name(layer(d))})"
        for m, deps in graph().items()
        for d in sorted(deps)
        if layer(d) > layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    deps = graph()
    # A package's modules import their own package face and the other way round: a package is one node here.
    nodes: dict[str, set[str]] = {m.split(".")[0]: set() for m in deps}
    for m, ds in deps.items():
        nodes[m.split(".")[0]] |= {d.split(".")[0] for d in ds} - {m.split(".")[0]}
    assert_no_circle(nodes)


def test_a_package_has_no_circle_inside_either():
    deps = graph()
    for package in {m.split(".")[0] for m in deps if "." in m}:
        inside = {
            m: {d for d in ds if d.startswith(f"{package}.")} for m, ds in deps.items() if m.startswith(f"{package}.")
        }
        assert_no_circle(inside)


def assert_no_circle(nodes: dict[str, set[str]]) -> None:
    """Depth-first over the graph: a node met again on its own path is a circle, named in full."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, "import circle: " + " -> ".join([*path[path.index(node) :], node])
        if node not in done:
            for d in sorted(nodes.get(node, ())):
                visit(d, [*path, node])
            done.add(node)

    for node in sorted(nodes):
        visit(node, [])


def test_the_reader_sees_deferred_imports(tmp_path):
    """The checks above are only as good as `imports`: an import inside a function is found."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from titletune import card\n    from titletune.reports import table\n")
    assert imports(source, {"card", "reports"}) == {"card", "reports"}


def _name(rank: int) -> str:
    return list(LAYERS)[rank]
