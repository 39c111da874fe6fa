"""The package's layering: each module imports only modules before it in the order data flows (README, "How the
code is laid out"); the benchmarks (``earlybert_ds.bench``) drive the package from outside it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "earlybert_ds"

#: The modules in the order data flows, foundations first (the README's "How the code is laid out"); ``bench`` is
#: the subpackage of the benchmarks: only what comes after it (the command) may import it.
#: ``modeling`` imports no other module of the package: its code is saved with each model and must stand alone.
ORDER = ["modeling", "faults", "atomic", "digest", "config", "distributed", "hardware", "plots", "monitor", "data",
         "ticket", "search", "flops", "shrink", "optim", "dsconfig", "engine", "checkpoint", "trainer", "summary",
         "model_card", "pipeline", "tasks", "squad", "pretrain", "finetune", "bench", "cli", "__main__", "__init__"]
#: The benchmark modules in order: the shared helpers first; each may import any core module before ``bench``.
BENCH_ORDER = ["common", "throughput", "pretrain", "finetune", "tickets", "lamb", "data", "__main__", "__init__"]


def _imports(path: Path, package: Path) -> set[str]:
    """The modules of ``package`` that ``path`` imports anywhere in it (module level, in functions, under
    TYPE_CHECKING), dotted below the package: ``config``, ``bench.common``."""
    here = list(path.relative_to(package).parent.parts)  # [] for a core module, ["bench"] for a benchmark
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[:len(here) - node.level + 1]
            out |= ({".".join(base + node.module.split("."))} if node.module
                    else {".".join(base + [a.name]) for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module == package.name:
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package.name + "."):
            out.add(node.module.partition(".")[2])
        elif isinstance(node, ast.Import):
            out |= {a.name.partition(".")[2] for a in node.names if a.name.startswith(package.name + ".")}
    return out


def _late_imports(package: Path) -> list[tuple[str, str]]:
    """(module, what it imports) for every import of a module at or after the importer in the order: a core
    module's of one after it (``bench`` included), a benchmark's of a later benchmark or of the command."""
    core = {p.stem for p in package.glob("*.py")} | {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    bench = {p.stem for p in (package / "bench").glob("*.py")}
    assert core <= set(ORDER), f"modules missing from ORDER: {sorted(core - set(ORDER))}"
    assert bench <= set(BENCH_ORDER), f"modules missing from BENCH_ORDER: {sorted(bench - set(BENCH_ORDER))}"
    late = []
    for m in core - {"bench"}:
        path = package / f"{m}.py" if (package / f"{m}.py").is_file() else package / m / "__init__.py"
        late += [(m, i) for i in _imports(path, package) if ORDER.index(i.split(".")[0]) >= ORDER.index(m)]
    for m in bench:
        for i in _imports(package / "bench" / f"{m}.py", package):
            top, _, sub = i.partition(".")
            if top == "bench" and BENCH_ORDER.index(sub or "__init__") >= BENCH_ORDER.index(m):
                late.append((f"bench.{m}", i))
            elif top != "bench" and ORDER.index(top) >= ORDER.index("bench"):
                late.append((f"bench.{m}", i))
    return late


def test_every_module_imports_only_modules_before_it():
    late = _late_imports(PACKAGE)
    assert not late, f"modules importing one at or after them in the stage order: {late}"


def test_the_layering_check_sees_imports_of_the_benchmarks(tmp_path):
    """The check itself: a core module importing a benchmark, and a benchmark importing a later one or the
    command, are all caught, however they are spelt."""
    package = tmp_path / "earlybert_ds"
    (package / "bench").mkdir(parents=True)
    files = {"config.py": "", "cli.py": "from .bench.__main__ import main\n",
             "pipeline.py": "from .config import RunConfig\n\ndef f():\n    from earlybert_ds.bench import common\n",
             "engine.py": "from .bench.common import SHAPES\n", "bench/__init__.py": "",
             "bench/common.py": "from ..config import RunConfig\nfrom .tickets import interval\n",
             "bench/tickets.py": "from ..cli import main\nfrom .common import SHAPES\n",
             "bench/__main__.py": "from . import common, tickets\n"}
    for name, text in files.items():
        (package / name).write_text(text)
    assert sorted(_late_imports(package)) == [("bench.common", "bench.tickets"), ("bench.tickets", "cli"),
                                              ("engine", "bench.common"), ("pipeline", "bench")]
