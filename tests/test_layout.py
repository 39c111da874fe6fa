"""The package's layering: each module imports only modules before it in the order data flows (README, "How the
code is laid out")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "earlybert_ds"

#: The modules in the order data flows, foundations first (the README's "How the code is laid out").
ORDER = ["faults", "atomic", "digest", "config", "distributed", "hardware", "plots", "monitor", "data", "ticket",
         "search", "modeling", "flops", "shrink", "optim", "dsconfig", "engine", "checkpoint", "trainer", "summary",
         "pipeline", "tasks", "squad", "pretrain", "finetune", "bench", "cli", "__main__", "__init__"]


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, anywhere in it (module level, in functions, under TYPE_CHECKING)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("earlybert_ds."):
            out.add(node.module.split(".")[1])
    return out


def test_every_module_imports_only_modules_before_it():
    modules = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert modules <= set(ORDER), f"modules missing from ORDER: {sorted(modules - set(ORDER))}"
    late = [(m, i) for m in modules for i in _imports(_source(m)) if ORDER.index(i) >= ORDER.index(m)]
    assert not late, f"modules importing one at or after them in the stage order: {late}"


def _source(module: str) -> Path:
    path = PACKAGE / f"{module}.py"
    return path if path.is_file() else PACKAGE / module / "__init__.py"
