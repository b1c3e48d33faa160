"""Small readers for the files in deploy/: Dockerfiles, .dockerignore, NATS config, env files,
Compose's variable interpolation. Strict where the real tools are, so a file these accept but
the tool would not is unlikely; not general-purpose."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"


class FormatError(ValueError):
    """A file does not parse; the message names the file and line."""


# ---- Dockerfile

INSTRUCTIONS = frozenset(
    "ADD ARG CMD COPY ENTRYPOINT ENV EXPOSE FROM HEALTHCHECK LABEL MAINTAINER ONBUILD RUN "
    "SHELL STOPSIGNAL USER VOLUME WORKDIR".split()
)
_DIRECTIVE = re.compile(r"#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*$")


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str

    def json_args(self) -> list[str] | None:
        """The exec form's argument list (a JSON array of strings), or None (shell form)."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FormatError(
                f"line {self.line}: {self.keyword} is not a JSON array: {exc}"
            ) from exc
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise FormatError(f"line {self.line}: {self.keyword} must be a JSON array of strings")
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """Every ENV of this stage, later ones winning (values unexpanded)."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            values.update(parse_env_instruction(instruction))
        return values

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    path: Path
    args: dict[str, str]  # ARG defaults declared before the first FROM
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped, as BuildKit reads them
    (the default escape character; parser directives only before anything else)."""
    lines = text.splitlines()
    escape = "\\"
    start = 0
    while start < len(lines):
        directive = _DIRECTIVE.match(lines[start].strip())
        if not directive:
            break
        if directive.group(1).lower() == "escape":
            escape = directive.group(2)
        start += 1
    instructions: list[Instruction] = []
    pending: list[str] = []
    first = 0
    for number, raw in enumerate(lines[start:], start + 1):
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comments and empty lines, even inside a continuation, are dropped
        if not pending:
            first = number
        if stripped.endswith(escape):
            pending.append(raw.rstrip()[: -len(escape)])
            continue
        pending.append(raw)
        joined = "".join(pending).strip()
        pending = []
        keyword, *rest = joined.split(None, 1)
        args = rest[0] if rest else ""
        if "<<" in args and keyword.upper() in ("RUN", "COPY", "ADD"):
            raise FormatError(f"line {first}: heredocs are not supported by this reader")
        instructions.append(Instruction(first, keyword.upper(), args.strip()))
    if pending:
        raise FormatError("the file ends inside a continuation line")
    return instructions


def substitute(text: str, variables: Mapping[str, str]) -> str:
    """${NAME}, $NAME and ${NAME:-default} as Dockerfile ARG substitution does them."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(4)
        if name in variables:
            return variables[name]
        return (match.group(3) or "") if match.group(2) == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:-)([^}]*))?\}|\$(\w+)", value, text)


def parse_dockerfile(path: Path) -> Dockerfile:
    """The stages of a Dockerfile; FormatError says what is wrong and where."""
    try:
        instructions = dockerfile_instructions(path.read_text())
    except FormatError as exc:
        raise FormatError(f"{path.name}: {exc}") from None
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions:
        where = f"{path.name}:{instruction.line}"
        if instruction.keyword not in INSTRUCTIONS:
            raise FormatError(f"{where}: unknown instruction {instruction.keyword}")
        if not instruction.args:
            raise FormatError(f"{where}: {instruction.keyword} without arguments")
        if instruction.keyword == "FROM":
            words = substitute(instruction.args, args).split()
            words = [w for w in words if not w.startswith("--platform=")]
            if len(words) not in (1, 3) or (len(words) == 3 and words[1].upper() != "AS"):
                raise FormatError(f"{where}: FROM IMAGE [AS NAME], got {instruction.args!r}")
            stages.append(Stage(words[0], words[2] if len(words) == 3 else None))
        elif not stages:
            if instruction.keyword != "ARG":
                raise FormatError(f"{where}: only ARG may come before the first FROM")
            name, _, default = instruction.args.partition("=")
            args[name.strip()] = default.strip()
        else:
            stages[-1].instructions.append(instruction)
            if instruction.keyword in ("CMD", "ENTRYPOINT", "SHELL", "VOLUME"):
                instruction.json_args()  # raises on a broken JSON array
    if not stages:
        raise FormatError(f"{path.name}: no FROM")
    names = [stage.name for stage in stages if stage.name]
    if len(names) != len(set(names)):
        raise FormatError(f"{path.name}: two stages with one name: {names}")
    return Dockerfile(path, args, stages)


def parse_env_instruction(instruction: Instruction) -> dict[str, str]:
    words = shlex.split(instruction.args, posix=True)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}  # the legacy `ENV KEY value` form
    values = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise FormatError(f"line {instruction.line}: ENV word {word!r} is not KEY=VALUE")
        values[key] = value
    return values


@dataclass
class Copy:
    line: int
    sources: list[str]
    dest: str
    from_stage: str | None


def parse_copy(instruction: Instruction) -> Copy:
    words = instruction.json_args()
    if words is None:
        words = shlex.split(instruction.args, posix=True)
    from_stage = None
    while words and words[0].startswith("--"):
        flag = words.pop(0)
        if flag.startswith("--from="):
            from_stage = flag.removeprefix("--from=")
    if len(words) < 2:
        raise FormatError(f"line {instruction.line}: COPY needs a source and a destination")
    return Copy(instruction.line, words[:-1], words[-1], from_stage)


def healthcheck_command(instruction: Instruction) -> list[str] | str | None:
    """HEALTHCHECK's command: the exec form's list, the shell form's string; None for NONE."""
    words = instruction.args.split()
    while words and words[0].startswith("--"):
        words.pop(0)
    if words == ["NONE"]:
        return None
    if not words or words[0] != "CMD":
        raise FormatError(f"line {instruction.line}: HEALTHCHECK [OPTIONS] CMD command")
    rest = instruction.args[instruction.args.index("CMD") + 3 :].strip()
    command = Instruction(instruction.line, "HEALTHCHECK", rest).json_args()
    return command if command is not None else rest


# ---- .dockerignore


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignore(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception, pattern) pairs of an ignore file, in order."""
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        rules.append((exception, _ignore_regex(pattern)))
    return rules


def ignored(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context leaves `relative` out: the last rule matching it, or one of
    its parent directories, decides (moby/patternmatcher's MatchesOrParentMatches)."""
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for exception, regex in rules:
        if any(regex.match(candidate) for candidate in candidates):
            result = not exception
    return result


# ---- NATS server configuration

NatsValue = str | list["NatsValue"] | dict[str, "NatsValue"]


class _NatsReader:
    """nats-server's config syntax, the part deploy/nats uses: `key: value`, `key = value`,
    `key { ... }`, arrays in [ ], # and // comments, quoted strings, $VARIABLE references."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> FormatError:
        line = self.text.count("\n", 0, self.pos) + 1
        return FormatError(f"line {line}: {message}")

    def skip(self, newlines: bool = True) -> None:
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "#" or self.text.startswith("//", self.pos):
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            elif char in " \t\r,;" or (newlines and char == "\n"):
                self.pos += 1
            else:
                return

    def block(self, closing: str | None) -> dict[str, NatsValue]:
        values: dict[str, NatsValue] = {}
        while True:
            self.skip()
            if self.pos >= len(self.text):
                if closing is not None:
                    raise self.error(f"missing {closing!r}")
                return values
            if closing is not None and self.text[self.pos] == closing:
                self.pos += 1
                return values
            key = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*").match(self.text, self.pos)
            if key is None:
                raise self.error(f"expected a key, found {self.text[self.pos]!r}")
            self.pos = key.end()
            self.skip(newlines=False)
            if self.pos < len(self.text) and self.text[self.pos] in ":=":
                self.pos += 1
                self.skip(newlines=False)
            if key.group() in values:
                raise self.error(f"{key.group()} given twice")
            values[key.group()] = self.value()

    def value(self) -> NatsValue:
        if self.pos >= len(self.text):
            raise self.error("a value is missing")
        char = self.text[self.pos]
        if char == "{":
            self.pos += 1
            return self.block("}")
        if char == "[":
            self.pos += 1
            items: list[NatsValue] = []
            while True:
                self.skip()
                if self.pos >= len(self.text):
                    raise self.error("missing ']'")
                if self.text[self.pos] == "]":
                    self.pos += 1
                    return items
                items.append(self.value())
        if char in "\"'":
            end = self.text.find(char, self.pos + 1)
            if end < 0:
                raise self.error("unterminated string")
            word = self.text[self.pos + 1 : end]
            self.pos = end + 1
            return word
        word_match = re.compile(r"[^\s,;\]\}#]+").match(self.text, self.pos)
        if word_match is None:
            raise self.error(f"expected a value, found {char!r}")
        self.pos = word_match.end()
        return word_match.group()


def parse_nats_config(text: str) -> dict[str, NatsValue]:
    return _NatsReader(text).block(None)


# ---- env files and Compose interpolation


@dataclass
class EnvFile:
    values: dict[str, str]  # KEY=VALUE lines
    commented: dict[str, str]  # #KEY=VALUE lines: a setting shown with its default or a sample


_ASSIGNMENT = re.compile(r"(#?)([A-Za-z_][A-Za-z0-9_]*)=(.*)\Z")


def read_env_file(path: Path) -> EnvFile:
    """An env file's assignments, values unquoted as a shell (or systemd) would."""
    env = EnvFile({}, {})
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        match = _ASSIGNMENT.match(line)
        if match is None:
            if line and not line.startswith("#"):
                raise FormatError(f"{path.name}:{number}: not KEY=VALUE: {raw!r}")
            continue
        target = env.commented if match.group(1) else env.values
        key = match.group(2)
        if key in env.values or key in env.commented:
            raise FormatError(f"{path.name}:{number}: {key} appears twice")
        try:
            words = shlex.split(match.group(3), posix=True)
        except ValueError as exc:
            raise FormatError(f"{path.name}:{number}: {exc}") from None
        if len(words) > 1:
            raise FormatError(f"{path.name}:{number}: quote a value with spaces")
        target[key] = words[0] if words else ""
    return env


_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def compose_variables(text: str) -> set[str]:
    """The variables a compose file interpolates."""
    return {
        m.group("braced") or m.group("bare")
        for m in _INTERPOLATION.finditer(text)
        if m.group() != "$$"
    }


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's interpolation: ${V}, $V, ${V:-default}, ${V-default}, ${V:?err}, $$."""

    def replace(match: re.Match[str]) -> str:
        if match.group() == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        present = name in variables and (variables[name] != "" or not (op or "").startswith(":"))
        if present:
            return variables[name]
        if op in (":?", "?"):
            raise FormatError(f"${{{name}}} is required: {arg}")
        return arg if op in (":-", "-") else ""

    return _INTERPOLATION.sub(replace, value)


def interpolate_tree(node: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [interpolate_tree(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(item, variables) for key, item in node.items()}
    return node


def service_environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A compose service's `environment`, as a mapping (it may be a list of KEY=VALUE)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (str(item).partition("=") for item in raw)
        return {key: value for key, _, value in pairs}
    return {str(key): "" if value is None else str(value) for key, value in raw.items()}


# ---- settings classes


def env_names(settings: type[BaseSettings]) -> dict[str, str]:
    """{environment variable (upper case): field name} that `settings` reads."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    names = {}
    for name, info in settings.model_fields.items():
        alias = info.validation_alias or info.alias
        variable = alias if isinstance(alias, str) else f"{prefix}{name}"
        names[variable.upper()] = name
    return names
