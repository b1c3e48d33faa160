"""Named contexts in `$XDG_CONFIG_HOME/gpuplane/config.toml` and `gpuplane context ...`."""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuplane_cli.client import EXIT_CONFLICT, EXIT_NOT_FOUND, EXIT_USAGE, CliError, Context
from gpuplane_cli.output import fields, print_json, table

# The TLS variables are taken as a group: when the environment sets any of them, the
# context's TLS settings are not mixed in (a CA from one place, plaintext from the other).
TLS_VARIABLES = (
    "GPUPLANE_PLAINTEXT",
    "GPUPLANE_CA_FILE",
    "GPUPLANE_CERT_FILE",
    "GPUPLANE_KEY_FILE",
)
# Key in the file → (type, GPUPLANE_* variable it stands in for).
_PATH_KEYS = {
    "cacert": "GPUPLANE_CA_FILE",
    "cert": "GPUPLANE_CERT_FILE",
    "key": "GPUPLANE_KEY_FILE",
}
_KNOWN_KEYS = {"addr", "api-key-file", "plaintext", *_PATH_KEYS}

PRECEDENCE = """\
contexts: `gpuplane context add NAME --addr HOST:PORT [--api-key-file F] [TLS flags]` keeps
named control planes in $XDG_CONFIG_HOME/gpuplane/config.toml (default ~/.config); `context
use NAME` picks the current one, --context NAME one for a single command. A context holds the
path of a key file, never a key. Each setting comes from the first of: command-line flags,
GPUPLANE_* environment (and env files), the context, the defaults."""


def config_path(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CONFIG_HOME", "").strip()
    root = Path(base) if base else Path.home() / ".config"
    return root / "gpuplane" / "config.toml"


def shown(path: Path) -> str:
    """The path as a user would type it: under the home directory as `~/...`."""
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return str(path)


@dataclass
class Profile:
    """One named context: where the control plane is and which files to use with it."""

    addr: str = ""
    api_key_file: str = ""
    cacert: str = ""
    cert: str = ""
    key: str = ""
    plaintext: bool = False

    def to_toml(self) -> dict[str, Any]:
        table: dict[str, Any] = {"addr": self.addr}
        if self.api_key_file:
            table["api-key-file"] = self.api_key_file
        for name in _PATH_KEYS:
            if getattr(self, name):
                table[name] = getattr(self, name)
        if self.plaintext:
            table["plaintext"] = True
        return table


@dataclass
class Config:
    """The whole file: its path, the current context's name and the contexts by name."""

    path: Path
    current: str = ""
    contexts: dict[str, Profile] = field(default_factory=dict)

    def error(self, name: str, message: str, code: int = EXIT_USAGE) -> CliError:
        return CliError(f"{shown(self.path)}: context {name!r}: {message}", code)

    def get(self, name: str) -> Profile:
        if name not in self.contexts:
            known = ", ".join(sorted(self.contexts)) or "none"
            if not self.path.exists():
                known += " (the file does not exist: `gpuplane context add` creates it)"
            raise self.error(name, f"no such context; known: {known}", EXIT_NOT_FOUND)
        return self.contexts[name]

    def save(self) -> None:
        """Writes the file (0600: it names key files) through a temporary file."""
        import tomli_w

        document: dict[str, Any] = {}
        if self.current:
            document["current-context"] = self.current
        document["contexts"] = {n: p.to_toml() for n, p in sorted(self.contexts.items())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            tomli_w.dump(document, out)
        os.chmod(temporary, 0o600)
        os.replace(temporary, self.path)


def load(environ: Mapping[str, str]) -> Config:
    """The config file (empty when it does not exist); a garbled one is an error naming the
    file and, from tomllib, the line and column."""
    path = config_path(environ)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Config(path)
    except OSError as exc:
        raise CliError(f"cannot read {shown(path)}: {exc.strerror}", EXIT_USAGE) from None
    try:
        document = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CliError(f"{shown(path)}: {exc}", EXIT_USAGE) from None
    config = Config(path, current=_text(document, "current-context", path, "the file"))
    contexts = document.get("contexts", {})
    if not isinstance(contexts, dict):
        raise CliError(f"{shown(path)}: `contexts` must be a table of [contexts.NAME]", EXIT_USAGE)
    for name, body in contexts.items():
        config.contexts[name] = _profile(config, name, body)
    return config


def _text(table: Mapping[str, Any], key: str, path: Path, where: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise CliError(f"{shown(path)}: {where}: `{key}` must be a string", EXIT_USAGE)
    return value


def _profile(config: Config, name: str, body: Any) -> Profile:
    if not isinstance(body, dict):
        raise config.error(name, "must be a table ([contexts.NAME])")
    unknown = sorted(set(body) - _KNOWN_KEYS)
    if unknown:
        known = ", ".join(sorted(_KNOWN_KEYS))
        raise config.error(name, f"unknown key {unknown[0]!r} (known: {known})")
    where = f"context {name!r}"
    profile = Profile(
        addr=_text(body, "addr", config.path, where),
        api_key_file=_text(body, "api-key-file", config.path, where),
        cacert=_text(body, "cacert", config.path, where),
        cert=_text(body, "cert", config.path, where),
        key=_text(body, "key", config.path, where),
    )
    plaintext = body.get("plaintext", False)
    if not isinstance(plaintext, bool):
        raise config.error(name, "`plaintext` must be true or false")
    profile.plaintext = plaintext
    if not profile.addr:
        raise config.error(name, "`addr` is missing")
    return profile


def layered(args: argparse.Namespace, environ: Mapping[str, str]) -> Mapping[str, str]:
    """`environ` with the chosen context (--context NAME, else the file's current one) behind
    it: the context fills in only what flags and the environment leave unset."""
    name = getattr(args, "context", None)
    if not name and not config_path(environ).exists():
        return environ  # no file, no --context: nothing to read
    config = load(environ)
    name = name or config.current
    if not name:
        return environ
    profile = config.get(name)
    values = {"GPUPLANE_ADDR": profile.addr}
    if profile.api_key_file and not (
        getattr(args, "api_key", None)
        or environ.get("GPUPLANE_API_KEY", "").strip()
        or environ.get("GPUPLANE_API_KEY_FILE", "").strip()
    ):
        try:
            values["GPUPLANE_API_KEY"] = Path(profile.api_key_file).expanduser().read_text()
        except OSError as exc:
            reason = f"cannot read its api-key-file {profile.api_key_file}: {exc.strerror}"
            raise config.error(name, reason) from None
    if not any(environ.get(variable, "").strip() for variable in TLS_VARIABLES):
        values.update(
            {v: getattr(profile, k) for k, v in _PATH_KEYS.items() if getattr(profile, k)}
        )
        if profile.plaintext:
            values["GPUPLANE_PLAINTEXT"] = "1"
    return ChainMap(dict(environ), values)


def register(subparsers: Any) -> None:
    """`gpuplane context list|show|use|add|remove`: they edit the file, never call a plane."""
    group_parser = subparsers.add_parser(
        "context", help="named control planes (like kubectl contexts)", description=PRECEDENCE
    )
    group = group_parser.add_subparsers(dest="context_command", metavar="COMMAND", required=True)

    def leaf(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(
            name, help=help_text, description=help_text
        )
        parser.set_defaults(handler=handler)
        return parser

    listing = leaf("list", list_contexts, "list the contexts; * marks the current one")
    listing.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    show = leaf("show", show_context, "show one context (default: the current one)")
    show.add_argument("name", nargs="?", default="")
    show.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    leaf("use", use_context, "make a context the current one").add_argument("name")
    leaf("remove", remove_context, "remove a context").add_argument("name")
    add = leaf("add", add_context, "add a context (the file is written 0600)")
    add.add_argument("name")
    add.add_argument("--addr", required=True, help="control plane host:port")
    add.add_argument("--api-key-file", default="", metavar="FILE", help="file holding the API key")
    add.add_argument("--cacert", default=argparse.SUPPRESS, metavar="PEM")
    add.add_argument("--cert", default=argparse.SUPPRESS, metavar="PEM")
    add.add_argument("--key", default=argparse.SUPPRESS, metavar="PEM")
    add.add_argument(
        "--plaintext", action="store_true", default=argparse.SUPPRESS, help="no TLS (dev stacks)"
    )


def _config(ctx: Context) -> Config:
    return load(ctx.environ)


def list_contexts(args: argparse.Namespace, ctx: Context) -> int:
    config = _config(ctx)
    if getattr(args, "json", False):
        rows = [{"name": n, "current": n == config.current, **p.to_toml()}
                for n, p in sorted(config.contexts.items())]  # fmt: skip
        print(json.dumps(rows, indent=2))
        return 0
    print(table(
        ["CURRENT", "NAME", "ADDR", "TLS"],
        [("*" if n == config.current else "", n, p.addr, _tls(p))
         for n, p in sorted(config.contexts.items())],
    ))  # fmt: skip
    return 0


def _tls(profile: Profile) -> str:
    if profile.plaintext:
        return "plaintext"
    return "client certificate" if profile.cert else "TLS"


def show_context(args: argparse.Namespace, ctx: Context) -> int:
    config = _config(ctx)
    name = args.name or config.current
    if not name:
        raise CliError(f"{shown(config.path)}: no current context (`gpuplane context use NAME`)")
    profile = config.get(name)
    if getattr(args, "json", False):
        print_json({"name": name, "current": name == config.current, **profile.to_toml()})
        return 0
    pairs = [("Context", name + (" (current)" if name == config.current else "")),
             ("Address", profile.addr), ("Key file", profile.api_key_file or None),
             ("CA", profile.cacert or None), ("Certificate", profile.cert or None),
             ("Private key", profile.key or None), ("TLS", _tls(profile)),
             ("File", shown(config.path))]  # fmt: skip
    print(fields(pairs))
    return 0


def use_context(args: argparse.Namespace, ctx: Context) -> int:
    config = _config(ctx)
    config.get(args.name)
    config.current = args.name
    config.save()
    print(f"current context: {args.name}")
    return 0


def remove_context(args: argparse.Namespace, ctx: Context) -> int:
    config = _config(ctx)
    config.get(args.name)
    del config.contexts[args.name]
    if config.current == args.name:
        config.current = ""
    config.save()
    print(f"removed context {args.name}")
    return 0


def add_context(args: argparse.Namespace, ctx: Context) -> int:
    config = _config(ctx)
    if args.name in config.contexts:
        message = "already exists (`gpuplane context remove` it first)"
        raise config.error(args.name, message, EXIT_CONFLICT)
    profile = Profile(addr=args.addr, plaintext=bool(getattr(args, "plaintext", False)))
    files = {"api_key_file": ("--api-key-file", args.api_key_file)}
    files |= {k: (f"--{k}", getattr(args, k, "")) for k in _PATH_KEYS}
    for attribute, (flag, value) in files.items():
        if not value:
            continue
        path = Path(value).expanduser().absolute()
        if not path.is_file():
            raise CliError(f"{flag} {value}: no such file", EXIT_USAGE)
        setattr(profile, attribute, str(path))
    if profile.plaintext and (profile.cacert or profile.cert or profile.key):
        raise CliError("--plaintext and --cacert/--cert/--key exclude each other", EXIT_USAGE)
    config.contexts[args.name] = profile
    config.save()
    print(f"added context {args.name} ({profile.addr}) to {shown(config.path)}")
    if not config.current:
        print(f"hint: `gpuplane context use {args.name}` makes it the current one")
    return 0
