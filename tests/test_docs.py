"""The docs stay true: every command line shown in README.md and docs/*.md names only options its program has (a
concrete line is parsed whole by the program's own argparse parser, which runs nothing), and the README's storage
layout names every folder a run creates under ROOT."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.resources import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
_PROGRAM = re.compile(r"(?:^|[\s`(])(?:\S*/)?python3?\s+(?:-m\s+(pipeline(?:\.[\w.]+)?)|(tools/\w+\.py))(?=\s|$)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_INLINE = re.compile(r"`([^`]+)`")
_SEPARATORS = re.compile(r"\s(?:&&|\|\||;|\|)\s|\s#\s|\s#$|\s\d?>")


@dataclass
class Command:
    where: str
    program: str
    args: str

    @property
    def synopsis(self) -> bool:
        """A usage line with optional parts or placeholders, or a bare mention of a command in prose (`python -m
        pipeline run`): only its command and option names can be checked."""
        return any(c in self.args for c in "[]<>|") or "..." in self.args or len(self.args.split()) < 2


def commands() -> list[Command]:
    """Every `python -m pipeline...` / `python tools/x.py` command line in the docs (fenced lines joined at
    trailing backslashes; inline spans too)."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        pieces = []
        for block in _FENCE.findall(text):
            pieces += block.replace("\\\n", " ").splitlines()[1:-1]
        pieces += [m.group(1) for m in _INLINE.finditer(_FENCE.sub("", text))]
        for piece in pieces:
            piece = " ".join(piece.split())
            for match in _PROGRAM.finditer(piece):
                rest = piece[match.end():]
                cut = _SEPARATORS.search(rest)
                args = (rest[: cut.start()] if cut else rest).strip()
                found.append(Command(f"{doc.name}: {piece[:90]}", match.group(1) or match.group(2), args))
    return found


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


_PARSERS: dict[str, argparse.ArgumentParser | None] = {}


def parser_of(program: str, monkeypatch) -> argparse.ArgumentParser | None:
    """The program's argparse parser (cached), caught as its main() is about to parse (nothing runs); None for a
    program that does not use argparse."""
    if program not in _PARSERS:
        _PARSERS[program] = _catch_parser(program, monkeypatch)
    return _PARSERS[program]


def _catch_parser(program: str, monkeypatch) -> argparse.ArgumentParser | None:
    if program.startswith("tools/"):
        path = REPO_ROOT / program
        if "parse_args" not in path.read_text():
            return None
        spec = importlib.util.spec_from_file_location(f"doccheck_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        name = "pipeline.cli" if program == "pipeline" else program
        module = importlib.import_module(name)
        if "parse_args" not in Path(module.__file__).read_text():
            return None

    def capture(self, args=None, namespace=None):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(sys, "argv", [program])
    try:
        module.main() if _takes_no_argv(module.main) else module.main([])
    except _Parsed as caught:
        return caught.parser
    finally:
        monkeypatch.undo()
    raise AssertionError(f"{program}: main() did not parse its arguments")


def _takes_no_argv(fn) -> bool:
    return fn.__code__.co_argcount == 0


def _subparser(parser: argparse.ArgumentParser, args: list[str]) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and args and args[0] in action.choices:
            return action.choices[args[0]]
    return parser


def _flags(args: str) -> list[str]:
    out = []
    for raw in re.split(r"[\s\[\]|]+", args):
        token = raw.split("=", 1)[0].rstrip(",.:)")
        if re.match(r"^--?[A-Za-z][\w-]*$", token):
            out.append(token)
    return out


COMMANDS = commands()


def test_the_docs_show_command_lines():
    programs = {c.program for c in COMMANDS}
    assert "pipeline" in programs and "tools/chaos.py" in programs and len(COMMANDS) > 50


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.where)
def test_command_line_in_docs_is_valid(cmd, monkeypatch):
    parser = parser_of(cmd.program, monkeypatch)
    if parser is None:
        return
    try:
        tokens = shlex.split(cmd.args)
    except ValueError:
        tokens = cmd.args.split()
    sub = _subparser(parser, tokens) if cmd.program == "pipeline" else parser
    if cmd.program == "pipeline" and tokens and sub is parser and tokens[0] != "...":
        pytest.fail(f"{cmd.where}: `{tokens[0]}` is not a command of python -m pipeline")
    unknown = [f for f in _flags(cmd.args) if f not in sub._option_string_actions]
    assert not unknown, f"{cmd.where}: no option {', '.join(unknown)} in {cmd.program} {tokens[:1]}"
    if not cmd.synopsis:
        try:
            parser.parse_args(tokens)  # the real parser: wrong values and missing arguments fail here
        except SystemExit as exc:
            pytest.fail(f"{cmd.where}: argparse refused it (exit {exc.code})")


# -- the storage layout ----------------------------------------------------------------------------------

def layout_folders() -> set[str]:
    """The folders the README's storage layout names: ROOT/<a>/ and ROOT/<a>/<b>/ for every ROOT/... path."""
    text = (REPO_ROOT / "README.md").read_text()
    block = text.split("## Storage layout", 1)[1].split("```", 2)[1]
    out = set()
    for path in re.findall(r"ROOT/(\S+)", block):
        parts = [p for p in path.split("/") if p]
        out.add(parts[0])
        for i in range(2, len(parts) + 1):
            if any("<" in p or "." in p for p in parts[:i]):
                break
            out.add("/".join(parts[:i]))
    return out


def assert_in_layout(root: Path) -> None:
    """Every folder a run made under `root` (top level, and the folders inside a stage's output named with '_')
    is in the README's storage layout."""
    layout = layout_folders()
    made = {p.name for p in root.iterdir()}
    made |= {f"{p.parent.name}/{p.name}" for p in root.glob("*/_*") if p.is_dir() and not p.parent.name.startswith("_")}
    missing = sorted(m for m in made if m not in layout)
    assert not missing, f"not in the README's storage layout: {missing}"


def test_declared_folders_are_in_the_layout():
    """The folders the code declares (storage, stages, the demo's gallery) appear in the layout."""
    from pipeline import storage
    from pipeline.config import load_config
    from pipeline.stage import stage_folders
    from stages.download.stage import INPUTS_DIR
    from stages.evaluate.stage import CACHE_DIR
    from stages.train.stage import PROGRESS_DIR

    declared = {storage.DONE_DIR, storage.FAILED_DIR, storage.RUNNING_DIR, storage.TMP_DIR, storage.LOGS_DIR,
                storage.RUN_META, INPUTS_DIR, PROGRESS_DIR, CACHE_DIR.rsplit("/", 1)[0], "gallery",
                *stage_folders(load_config()).values()}
    assert sorted(declared - layout_folders()) == []


# -- the tools start as the docs show them ----------------------------------------------------------------

TOOLS_IMPORTING_TOOLS = sorted(p for p in (REPO_ROOT / "tools").glob("*.py")
                               if re.search(r"^\s*from tools[.\s]|^\s*import tools\b", p.read_text(), re.M))


@pytest.mark.parametrize("tool", TOOLS_IMPORTING_TOOLS, ids=lambda p: p.name)
def test_a_tool_that_imports_its_siblings_starts_as_a_script(tool, tmp_path):
    """`python tools/x.py` puts tools/ on the path, not the repository: a tool importing `tools.<y>` must add it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(tool), "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
