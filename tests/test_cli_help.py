"""Every `sdtorch` subcommand explains itself (issue 21): its `--help` runs, every option has a help text
that gives its default, `train` and `train-vae` show their options in named groups, and an unknown flag or a
missing argument ends in one `sdtorch: error:` line with exit code 2, never a traceback."""

from __future__ import annotations

import argparse

import pytest

from sdtorch.cli import build_parser


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(words, parser) of the top-level parser and of every subcommand below it, subcommands of
    subcommands (`eval shapes`) included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


COMMANDS = dict(commands(build_parser()))
LEAVES = [words for words, p in COMMANDS.items()
          if words and not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)]
IDS = [" ".join(words) or "sdtorch" for words in COMMANDS]


def documented(parser: argparse.ArgumentParser):
    """The actions that must carry a help text: all but -h/--help and --version (argparse writes those)."""
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


@pytest.mark.parametrize("words", list(COMMANDS), ids=IDS)
def test_every_option_has_help_with_its_default(words):
    parser = COMMANDS[words]
    parser.format_help()  # a stray % in a help text would fail here
    for action in documented(parser):
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help and choice.help.strip(), f"{' '.join(words)} {choice.dest}: no help"
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, f"{name}: no help"
        if action.option_strings:
            assert "default" in action.help or "required" in action.help, f"{name}: help names no default"


@pytest.mark.parametrize("command", ["train", "train-vae"])
def test_training_options_are_grouped(command):
    parser = COMMANDS[(command,)]
    titles = {}
    for group in parser._action_groups:
        for action in group._group_actions:
            titles[action.dest] = group.title
    ungrouped = [a.dest for a in documented(parser) if titles[a.dest] in ("options", "positional arguments")]
    assert not ungrouped, f"{command}: options outside a named group: {ungrouped}"
    assert {"data", "model", "optimisation", "checkpoints and resuming", "output and logging"} <= set(titles.values())


@pytest.mark.parametrize("words", list(COMMANDS), ids=IDS)
def test_help_runs(cli, tmp_path, words):
    code, out, err = cli([*words, "--help"], tmp_path)
    assert (code, err) == (0, ""), (code, err)
    assert out.startswith("usage: sdtorch"), out


def required_argv(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder values for the required options and positionals, so that only the flag added next is wrong."""
    argv = []
    for a in parser._actions:
        if a.required and a.option_strings:
            argv += [a.option_strings[0], *["1"] * (a.nargs if isinstance(a.nargs, int) else 1)]
    return argv + ["x" for a in parser._actions if not a.option_strings and a.nargs is None]


def assert_one_error_line(code: int, err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("sdtorch: error:"), (code, err)
    return lines[0]


@pytest.mark.parametrize("words", LEAVES, ids=[" ".join(w) for w in LEAVES])
def test_unknown_flag_is_one_line(cli, tmp_path, words):
    code, _, err = cli([*words, *required_argv(COMMANDS[words]), "--no-such-flag"], tmp_path)
    assert "--no-such-flag" in assert_one_error_line(code, err)
    assert not list(tmp_path.iterdir())


MISSING = [words for words, p in COMMANDS.items() if words and any(a.required for a in p._actions)]


@pytest.mark.parametrize("words", MISSING, ids=[" ".join(w) for w in MISSING])
def test_missing_argument_is_one_line(cli, tmp_path, words):
    code, _, err = cli(list(words), tmp_path)
    assert "required" in assert_one_error_line(code, err)
