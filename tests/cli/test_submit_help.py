"""`jobs submit --help` documents every flag, and its examples are commands the CLI takes."""

from __future__ import annotations

import argparse
import shlex

from gpuplane_cli import apply, jobs
from gpuplane_cli.main import build_parser


def _submit_parser() -> argparse.ArgumentParser:
    parser = build_parser(["jobs", "submit"])
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    jobs_parser = groups[0].choices["jobs"]
    leaves = [a for a in jobs_parser._actions if isinstance(a, argparse._SubParsersAction)]
    submit: argparse.ArgumentParser = leaves[0].choices["submit"]
    return submit


def test_every_submit_flag_has_help() -> None:
    undocumented = [
        action.option_strings[0]
        for action in _submit_parser()._actions
        if action.option_strings and not (action.help and action.help.strip())
    ]
    assert undocumented == []


def test_the_help_examples_parse_as_submit_and_apply_commands() -> None:
    text = jobs.SUBMIT_EPILOG.split("examples:\n", 1)[1].replace("\\\n", " ")
    examples = [line.split("  #")[0].strip() for line in text.splitlines() if line.strip()]
    assert len(examples) == 4
    for example in examples:
        words = shlex.split(example)
        assert words[0] == "gpuplane"
        # main() hands what follows `--` to the job as its command, untouched.
        options = words[1 : words.index("--")] if "--" in words else words[1:]
        args = build_parser(options).parse_args(options)
        assert args.handler in (jobs.submit_job, apply.apply_job), example
