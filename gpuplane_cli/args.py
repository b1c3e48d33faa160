"""Argparse helpers shared by the command modules: typed values, common options, handlers."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from gpuplane_cli import units
from gpuplane_cli.client import Context
from gpuplane_cli.output import enum_value

T = TypeVar("T")
Handler = Callable[[argparse.Namespace, Context], Awaitable[int]]
SyncHandler = Callable[[argparse.Namespace, Context], int]
Subparsers = Any  # argparse's _SubParsersAction is private; its type is not worth spelling out


def typed(parse: Callable[[str], T], name: str) -> Callable[[str], T]:
    """Wraps a parser so argparse reports its ValueError message instead of a generic one."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert


credits = typed(units.parse_credits, "credits")
credits_or_zero = typed(lambda t: units.parse_credits(t, allow_zero=True), "credits")
duration = typed(units.parse_duration, "duration")
size = typed(units.parse_size, "size")
cpus = typed(units.parse_cpus, "cpus")
key_value = typed(units.parse_key_value, "KEY=VALUE")
moment = typed(units.parse_time, "time")


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def reliability(text: str) -> int:
    """A reliability in percent ("95", "99.5%") as per mille: 0 to 100, one decimal at most."""
    try:
        permille = float(text.strip().removesuffix("%")) * 10
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage (e.g. 95)") from None
    if not 0 <= permille <= 1000 or abs(permille - round(permille)) > 1e-9:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be between 0 and 100 with one decimal at most"
        )
    return round(permille)


def enum_arg(enum: Any, name: str) -> Callable[[str], int]:
    return typed(lambda text: enum_value(enum, text), name)


def common_options(*, suppress: bool) -> argparse.ArgumentParser:
    """--addr, --api-key, TLS (--plaintext, --cacert, --cert, --key), --env-file, --json and
    --timeout, accepted before the command and after it. Leaf parsers use SUPPRESS defaults
    so a later position does not reset an earlier one."""
    default: Any = argparse.SUPPRESS if suppress else None
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection and output")
    group.add_argument(
        "--addr", default=default, help="control plane host:port (env GPUPLANE_ADDR)"
    )
    group.add_argument(
        "--api-key",
        default=default,
        help="bearer API key (env GPUPLANE_API_KEY, or GPUPLANE_API_KEY_FILE naming a file "
        "that holds it: prefer either, a flag's value is visible to every user in ps)",
    )
    group.add_argument(
        "--plaintext",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="no TLS: for a dev stack (env GPUPLANE_PLAINTEXT=1; `gpuplane up` sets it)",
    )
    group.add_argument(
        "--cacert",
        default=default,
        metavar="PEM",
        help="CA that verifies the control plane (env GPUPLANE_CA_FILE); default: system roots",
    )
    group.add_argument(
        "--cert", default=default, metavar="PEM", help="client certificate (env GPUPLANE_CERT_FILE)"
    )
    group.add_argument(
        "--key", default=default, metavar="PEM", help="its private key (env GPUPLANE_KEY_FILE)"
    )
    group.add_argument(
        "--env-file",
        default=default,
        help="read KEY=VALUE settings from this file; its values override the environment "
        "(env GPUPLANE_ENV_FILE: a file whose values only fill in what is unset)",
    )
    group.add_argument(
        "--context",
        default=default,
        metavar="NAME",
        help="use this context of ~/.config/gpuplane/config.toml for this command "
        "(default: its current one; see `gpuplane context`)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="machine-readable JSON output (proto field names)",
    )
    group.add_argument(
        "--timeout", type=float, default=default, help="seconds to wait for each unary call"
    )
    return parent


def add_leaf(
    subparsers: Subparsers,
    name: str,
    handler: Handler | SyncHandler,
    help_text: str,
    common: argparse.ArgumentParser,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """A leaf command whose handler runs with the parsed arguments and a Context."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help_text, description=help_text, parents=[common], **kwargs
    )
    parser.set_defaults(handler=handler)
    return parser


def add_group(subparsers: Subparsers, name: str, help_text: str, **kwargs: Any) -> Subparsers:
    """A command group (`gpuplane jobs ...`) whose subcommand is required."""
    parser = subparsers.add_parser(name, help=help_text, description=help_text, **kwargs)
    group = parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)
    return group
