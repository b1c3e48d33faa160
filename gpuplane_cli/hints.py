"""Usage errors that say what was probably meant: misspelt commands, a job command without `--`."""

from __future__ import annotations

import argparse
import difflib
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

# Option values never echoed back in a suggested command line.
_SECRET_DESTS = frozenset({"api_key"})


class UsageError(SystemExit):
    """A usage error already reported on stderr; exits 2 like argparse's own. It carries the
    parser that failed so that the caller can add a hint about the whole command line."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(2)
        self.parser = parser
        self.message = message


class Parser(argparse.ArgumentParser):
    """The CLI's parser class (subparsers inherit it): an unknown command gets a "did you
    mean", and every usage error raises UsageError after printing argparse's message."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise UsageError(self, message)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if isinstance(action, argparse._SubParsersAction) and value not in (choices or {}):
            message = unknown_command(self.prog, str(value), list(choices or {}))
            print(message, file=sys.stderr)
            raise UsageError(self, message)
        super()._check_value(action, value)


def unknown_command(prog: str, word: str, commands: Sequence[str]) -> str:
    """`gpuplane: unknown command 'jobs lsit'; did you mean 'jobs list'?` (difflib's closest
    match), or the list of commands when nothing is close."""
    root, *path = prog.split()
    typed = " ".join([*path, word])
    close = difflib.get_close_matches(word, commands, n=1, cutoff=0.6)
    if close:
        meant = " ".join([*path, close[0]])
        return f"{root}: unknown command '{typed}'; did you mean '{meant}'?"
    return f"{root}: unknown command '{typed}' (choose from {', '.join(commands)})"


def all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser in the tree, the root first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from all_parsers(child)


def parse(
    parser: argparse.ArgumentParser,
    words: Sequence[str],
    command: Sequence[str],
    takes_command: Callable[..., Any],
) -> argparse.Namespace:
    """parse_args, plus a hint when a usage error of the command whose handler is
    `takes_command` (`jobs submit`) looks like a container command given without `--`."""
    try:
        args, extras = parser.parse_known_args(words)
        if extras:
            failed = next(
                (p for p in all_parsers(parser) if p.get_default("handler") is args.handler), parser
            )
            _unrecognized(failed, extras)
        return args
    except UsageError as exc:
        if exc.parser.get_default("handler") is takes_command:
            hint = dashes_hint(exc.parser, words, command)
            if hint:
                print(hint, file=sys.stderr)
        raise


def _unrecognized(parser: argparse.ArgumentParser, extras: Sequence[str]) -> NoReturn:
    parser.error(f"unrecognized arguments: {' '.join(extras)}")


def dashes_hint(
    parser: argparse.ArgumentParser, words: Sequence[str], command: Sequence[str]
) -> str | None:
    """When words after `submit` are not its options (`submit --image busybox echo -n hi`),
    the command line that was probably meant: the image in --image, the rest after `--`."""
    if "submit" not in words:
        return None
    rest = list(words[words.index("submit") + 1 :])
    options: list[str] = []
    at = 0
    while at < len(rest) and rest[at].startswith("-"):
        name, eq, _ = rest[at].partition("=")
        action = parser._option_string_actions.get(name)
        if action is None:
            break  # not one of submit's options: the container command's flag
        width = 1 if eq or action.nargs == 0 else 2
        given = rest[at : at + width]
        if action.dest in _SECRET_DESTS:
            given = [f"{name}=…"] if eq else [name, "…"]
        options += given
        at += width
    stray = rest[at:]
    if not stray or stray[0].startswith("-"):
        return None  # a mistyped option, not a command
    if "--image" not in options and not any(o.startswith("--image=") for o in options):
        options += ["--image", stray.pop(0)]
        if not stray and not command:
            return None
    meant = shlex.join(["gpuplane", "jobs", "submit", *options, "--", *stray, *command])
    return f"hint: put `--` before the container's command and its arguments: {meant}"
