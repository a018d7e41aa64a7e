"""Every ``gfnet-edge`` subcommand's ``--help`` (each option explained, with its default), and the
options and Python names README.md and docs/*.md give (each one exists)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from gfnet_edge import cli


def _subparsers():
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _options():
    for command, parser in _subparsers().items():
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction):  # options and positional arguments
                yield command, parser, action


def _help_text(parser, action) -> str:
    """The help of ``action`` as ``--help`` prints it (``%(default)s`` and the like expanded)."""
    return parser._get_formatter()._expand_help(action) if action.help else ""


@pytest.mark.parametrize("command,parser,action",
                         [pytest.param(c, p, a, id=f"{c} {(a.option_strings or [a.dest])[-1]}") for c, p, a in _options()])
def test_every_option_is_explained_and_states_its_default(command, parser, action):
    text = _help_text(parser, action)
    assert text.strip() and action.help != argparse.SUPPRESS, f"{command} {action.option_strings or action.dest}: no help text"
    if action.default not in (None, False, [], argparse.SUPPRESS):  # a value the user gets without the option
        assert "default" in text.lower(), (f"{command} {action.option_strings}: default {action.default!r} not "
                                           f"stated in its help: {text!r}")


ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _options_by_command():
    return {command: {o for a in parser._actions for o in a.option_strings}
            for command, parser in _subparsers().items()}


def undefined_options(text: str, options) -> list:
    """``(line, command, option)`` for each option a ``gfnet-edge COMMAND ...`` command line of
    ``text`` gives (in a code block or an inline code span; inline ones may leave out
    ``gfnet-edge``) that ``COMMAND``'s parser does not have."""
    commands = "|".join(sorted(map(re.escape, options), key=len, reverse=True))
    text = re.sub(r"\\\n\s*", " ", text)  # a shell line continued on the next
    found = []
    in_block = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        spans = [line] if in_block else re.findall(r"`([^`]+)`", line)
        for span in spans:
            starts = [m for m in re.finditer(r"(?<![\w/-])gfnet-edge\s+(%s)(?![\w-])" % commands, span)]
            if not in_block:  # an inline span may start with the subcommand alone: `predict --json`
                starts += list(re.finditer(r"^\s*(%s)(?=\s)" % commands, span))
            for m in starts:
                rest = re.split(r"&&|\|\||[;|#]|\bgfnet-edge\b", span[m.end():])[0]
                for option in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", rest):
                    if option not in options[m.group(1)]:
                        found.append((number, m.group(1), option))
    return found


def test_the_docs_check_finds_an_option_a_command_does_not_have():
    options = _options_by_command()
    text = ("Run `gfnet-edge predict B x.png --no-such-flag` or `calibrate B --data demo --tolerance 0.1,0.1 "
            "--bogus`.\n```bash\ngfnet-edge build-engine CK -o B \\\n    --precision int8 --calib-dir D\n"
            "gfnet-edge info CK --json  # --comment-only\n```\n")
    assert undefined_options(text, options) == [(1, "predict", "--no-such-flag"), (1, "calibrate", "--bogus"),
                                                (3, "build-engine", "--calib-dir")]


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_docs_name_only_options_the_command_has(doc):
    assert undefined_options(doc.read_text(encoding="utf-8"), _options_by_command()) == []


def unresolved_python_names(text: str) -> list:
    """The ``gfnet_edge.a.b`` names and ``from gfnet_edge.a import b, c`` imports of ``text``
    that do not resolve to a module or one of its attributes."""
    import importlib

    def resolves(name: str) -> bool:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for part in parts[i:]:
                if not hasattr(obj, part):
                    return False
                obj = getattr(obj, part)
            return True
        return False

    names = set(re.findall(r"\bgfnet_edge(?:\.[A-Za-z_]\w*)+", text))
    item = r"\w+(?:\s+as\s+\w+)?"  # a name, perhaps imported as another
    for module, wrapped, line in re.findall(r"from (gfnet_edge[\w.]*) import (?:\(([^)]*)\)|(%s(?:\s*,\s*%s)*))"
                                            % (item, item), text):
        for imported in re.sub(r"#[^\n]*", "", wrapped or line).split(","):  # a wrapped list may hold comments
            if imported.strip():
                names.add(f"{module}.{imported.split()[0]}")  # the name, not its alias
    return sorted(n for n in names if not resolves(n))


def test_the_api_check_finds_a_name_that_does_not_exist():
    text = ("`gfnet_edge.Runtime`, `gfnet_edge.ops.no_such_op`\n"
            "from gfnet_edge.evaluate import fit_thresholds, fit_everything\n"
            "from gfnet_edge.ops import (preprocess, no_such_first,  # a wrapped list\n"
            "                            glance as g, no_such_second)\n"
            "`from gfnet_edge.ops import crop_patches as cut, no_such_third` cuts patches\n")
    assert unresolved_python_names(text) == ["gfnet_edge.evaluate.fit_everything", "gfnet_edge.ops.no_such_first",
                                             "gfnet_edge.ops.no_such_op", "gfnet_edge.ops.no_such_second",
                                             "gfnet_edge.ops.no_such_third"]


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_docs_name_only_python_api_that_exists(doc):
    pytest.importorskip("torch")  # gfnet_edge.models, .train: the build side
    assert unresolved_python_names(doc.read_text(encoding="utf-8")) == []
