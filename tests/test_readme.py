"""The documentation's promises name tests that exist: a guarantee whose named test is gone is a broken promise."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "ds_configs").glob("*.md"))]
#: ``tests/test_x.py::test_y``, or ``::test_z`` continuing the file named last on the same line
REF = re.compile(r"(tests/test_\w+\.py)?::(\w+)")


def named_tests(text: str) -> list[tuple[str, str]]:
    """Every (test file, test name) a text names, ``::name`` after ``file::other`` on a line counting for ``file``."""
    refs = []
    for line in text.splitlines():
        current = None
        for m in REF.finditer(line):
            current = m.group(1) or current
            if current:
                refs.append((current, m.group(2)))
    return refs


def test_named_tests_are_parsed_with_their_file():
    line = "| x | y | `tests/test_a.py::test_one`, `::test_two` | and `tests/test_b.py::test_three` |"
    assert named_tests(line) == [("tests/test_a.py", "test_one"), ("tests/test_a.py", "test_two"),
                                 ("tests/test_b.py", "test_three")]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_test_the_docs_name_exists(doc):
    missing = []
    for file, name in named_tests(doc.read_text(encoding="utf-8")):
        path = REPO / file
        if not path.is_file() or not re.search(rf"^\s*def {name}\(", path.read_text(), re.MULTILINE):
            missing.append(f"{file}::{name}")
    assert not missing, f"{doc.name} names tests that do not exist: {missing}"


# --- The README is a user guide whose commands, options, files and links are real --------------------------------

#: The two commands every user and CI start from (``.ci/run`` runs the second).
MAIN_JOB = "bash launch/setup.sh && bash launch/pretrain.sh --output-dir runs/demo --resume"
TEST_COMMAND = "bash launch/setup.sh && .venv/bin/python -m pytest -q -n 2"
#: Launch scripts and the sub-command whose options they pass on.
SCRIPTS = {"launch/pretrain.sh": "pretrain", "launch/multinode.sh": "pretrain", "launch/multinode_nossh.sh": "pretrain",
           "launch/slurm.sbatch": "pretrain", "launch/finetune.sh": "finetune"}
#: Top-level folders of the repository: a command argument under one of them names a file that must exist.
REPO_DIRS = ("launch/", "ds_configs/", "docs/", "tests/", "earlybert_ds/", ".ci/")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)*)`(?!`)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
SECTION_FIELD = re.compile(r"(?<![\w-])--([a-z_]+)\.([a-z_0-9]+)")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """'pretrain', 'finetune', ... and 'bench SUITE' -> the real parser of that command."""
    from earlybert_ds.bench.__main__ import build_parser as bench_parser
    from earlybert_ds.cli import build_parser

    out = {name: p for name, p in _subparsers(build_parser()).items() if name != "bench"}
    bench = bench_parser()
    out["bench"] = bench
    out.update({f"bench {name}": p for name, p in _subparsers(bench).items()})
    return out


def shell_commands(text: str) -> list[str]:
    """The commands of a markdown text: each line of its bash blocks (continuations joined, comments dropped, split at
    ``&&``/``;``/``|``), and each inline code span that starts with a command of this package."""
    out = []
    for lang, body in FENCE.findall(text):
        if lang in ("bash", "sh", "shell"):
            for line in re.sub(r"\\\n\s*", " ", body).splitlines():
                line = re.sub(r"(^|\s)#.*", "", line)
                out += [" ".join(c.split()) for c in re.split(r"&&|;|\|", line) if c.strip()]
    for span in INLINE.findall(FENCE.sub("", text)):
        span = " ".join(span.split())
        if re.match(r"(\.venv/bin/)?(earlybert-ds|python -m earlybert_ds)\b|(NPROC=\d+ )?bash launch/", span):
            out.append(span)
    return out


def command_of(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(the sub-command, its arguments) of a tokenised command line that runs this package, else ``None``."""
    for i, tok in enumerate(tokens):
        rest = tokens[i + 1:]
        if tok.endswith("earlybert-ds") or (tok == "earlybert_ds" and i and tokens[i - 1] in ("-m", "--module")):
            if rest and rest[0] == "bench" and rest[1:] and not rest[1].startswith("-"):
                return f"bench {rest[1]}", rest[2:]
            return (rest[0], rest[1:]) if rest else None
        if tok == "earlybert_ds.bench" and i and tokens[i - 1] == "-m":
            return (f"bench {rest[0]}", rest[1:]) if rest and not rest[0].startswith("-") else ("bench", rest)
        if tok in SCRIPTS:  # the multi-node launchers take ``finetune`` as their first argument
            return (rest[0], rest[1:]) if rest[:1] == ["finetune"] else (SCRIPTS[tok], rest)
    return None


def command_problems(command: str, parsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    """What in one documented command does not exist: its sub-command, an option, a repository file, a recipe."""
    try:
        tokens = shlex.split(command)
    except ValueError:
        return []  # a fragment of a larger shell construct (a quote opened on another line)
    problems = [f"{tok} (no such file)" for tok in tokens[:-1 if tokens and tokens[0] == "cp" else None]
                if tok.startswith(REPO_DIRS) and "$" not in tok and not (REPO / tok.split("=")[-1]).exists()]
    found = command_of(tokens)
    if found is None:
        return problems
    name, args = found
    if any(word.isupper() for word in name.split()):
        return problems  # a placeholder: ``earlybert-ds bench SUITE``
    parser = parsers.get(name)
    if parser is None:
        return problems + [f"sub-command {name!r} does not exist"]
    for i, arg in enumerate(args):
        if arg.startswith("--") and "$" not in arg and arg.split("=")[0] not in parser._option_string_actions:
            problems.append(f"{name} {arg.split('=')[0]} (no such option)")
        if arg == "--config" and i + 1 < len(args):
            recipe = args[i + 1]
            if not (REPO / recipe).is_file() and not any((REPO / "earlybert_ds").rglob(f"{recipe}.y*ml")) \
                    and not any((REPO / "earlybert_ds").rglob(f"{recipe}.json")):
                problems.append(f"--config {recipe} (neither a file nor a shipped recipe)")
    return problems


def test_commands_of_a_text_are_found_and_checked():
    text = ("Run `earlybert-ds pretrain --help` and\n```bash\n# a comment --no.such\nNPROC=8 bash launch/pretrain.sh "
            "--train.steps 5 \\\n  --no-such-flag --output-dir x && .venv/bin/python -m earlybert_ds.bench tickets "
            "--seeds 2\ncp launch/hostfile.example launch/hostfile\n.venv/bin/earlybert-ds nosuch --x\n```\n")
    commands = shell_commands(text)
    assert commands == ["NPROC=8 bash launch/pretrain.sh --train.steps 5 --no-such-flag --output-dir x",
                        ".venv/bin/python -m earlybert_ds.bench tickets --seeds 2",
                        "cp launch/hostfile.example launch/hostfile", ".venv/bin/earlybert-ds nosuch --x",
                        "earlybert-ds pretrain --help"]
    parsers = _parsers()
    assert [command_problems(c, parsers) for c in commands] == [
        ["pretrain --no-such-flag (no such option)"], [], [], ["sub-command 'nosuch' does not exist"], []]
    assert command_problems("deepspeed --num_gpus 2 --module earlybert_ds finetune --task sst2 --pretrain.x 1 "
                            "--deepspeed ds_configs/nosuch.json --config nosuch", parsers) == [
        "ds_configs/nosuch.json (no such file)", "finetune --pretrain.x (no such option)",
        "--config nosuch (neither a file nor a shipped recipe)"]


def test_readme_is_a_user_guide_that_starts_with_the_two_commands():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: studies and details belong in docs/"
    first = next(i for i, line in enumerate(lines) if line.startswith("bash ") or line.startswith(".venv/"))
    assert first < 40, f"the first runnable command is on line {first + 1}"
    assert MAIN_JOB in lines and TEST_COMMAND in lines
    assert TEST_COMMAND in (REPO / ".ci" / "run").read_text(), ".ci/run must run the README's test command"
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_documented_commands_name_real_sub_commands_options_and_files(doc):
    parsers = _parsers()
    problems = [f"{c!r}: {p}" for c in shell_commands(doc.read_text(encoding="utf-8"))
                for p in command_problems(c, parsers)]
    assert not problems, f"{doc.relative_to(REPO)}: " + "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_section_field_the_docs_name_is_a_run_config_field(doc):
    from earlybert_ds.config import all_fields

    fields = all_fields()
    unknown = sorted({f"--{s}.{f}" for s, f in SECTION_FIELD.findall(doc.read_text(encoding="utf-8"))
                      if f"{s}.{f}" not in fields})
    assert not unknown, f"{doc.relative_to(REPO)} names options that are not run-config fields: {unknown}"


def slug(heading: str) -> str:
    """The anchor GitHub gives a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_reach_a_file_and_its_heading(doc):
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"\w+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md":
            text = FENCE.sub("", dest.read_text(encoding="utf-8"))
            if anchor not in {slug(h) for h in re.findall(r"^#+ (.*)$", text, re.MULTILINE)}:
                broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(REPO)} links to: {broken}"
