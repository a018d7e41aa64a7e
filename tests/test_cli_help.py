"""Every ``gfnet-edge`` subcommand's ``--help``: each option explained, with its default."""
from __future__ import annotations

import argparse

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
