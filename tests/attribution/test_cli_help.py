"""Every option of every ``python -m attribution`` command says what it does and what its default is."""

import argparse
import re

import pytest

from attribution.__main__ import COMMANDS, build_parser
from attribution.__main__ import main as cli


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_a_help_that_states_its_default(command):
    parser = build_parser(command)
    options = _options(parser)
    assert options, f"{command} has no documented options"
    formatter = parser._get_formatter()
    problems = []
    for action in options:
        name = "/".join(action.option_strings)
        if not action.help:
            problems.append(f"{name}: no help")
            continue
        text = formatter._expand_help(action)  # %(default)s and the like filled in, as --help prints them
        if not re.search(r"\bdefault\b", text, re.IGNORECASE):
            problems.append(f"{name}: the help does not state the default: {text!r}")
        elif re.search(r"default: None\b", text):
            problems.append(f"{name}: 'default: None' says nothing; say what an omitted option means: {text!r}")
        # A concrete default must be the one printed (a hand-written number can go stale).
        is_flag = action.nargs == 0
        if not is_flag and action.default is not None and str(action.default) not in text:
            problems.append(f"{name}: the default {action.default!r} is not in the help: {text!r}")
    assert not problems, f"python -m attribution {command} --help:\n" + "\n".join(problems)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m attribution {command}") and "(default:" in out


def test_the_top_level_help_names_every_command(capsys):
    assert cli(["--help"]) == 0
    out = capsys.readouterr().out
    missing = [c for c in COMMANDS if f"``{c}``" not in out]
    assert not missing, f"commands not described in python -m attribution --help: {missing}"
    assert "<command> --help" in out


def test_an_unknown_command_is_refused_on_stderr_with_the_accepted_ones(capsys):
    assert cli(["dmeo"]) == 2
    captured = capsys.readouterr()
    assert "unknown command 'dmeo'; accepted commands: demo, bench," in captured.err and captured.out == ""
    with pytest.raises(ValueError, match=r"unknown command 'dmeo'; accepted values: demo, bench"):
        build_parser("dmeo")
