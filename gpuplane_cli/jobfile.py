"""Job files for `gpuplane apply`: YAML read with line marks, checked field by field."""

from __future__ import annotations

import argparse
import difflib
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from gpuplane.v1 import types_pb2

from gpuplane_cli import args as a
from gpuplane_cli import data, units
from gpuplane_cli.output import enum_value

_TAG = "tag:yaml.org,2002:"
_CONSTRUCTOR = yaml.constructor.SafeConstructor()


class Problem(Exception):
    """What is wrong with one field's value; `node` points at the part to blame."""

    def __init__(self, message: str, node: yaml.Node | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.node = node


def line_of(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _tag(node: yaml.Node) -> str:
    return str(node.tag).removeprefix(_TAG)


def _scalar(node: yaml.Node, what: str) -> yaml.ScalarNode:
    if not isinstance(node, yaml.ScalarNode) or _tag(node) == "null":
        raise Problem(f"expected {what}, got {_kind(node)}", node)
    return node


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if _tag(node) == "null":
        return "nothing"
    names = {"bool": "the boolean", "str": "the text"}
    return f"{names.get(_tag(node), 'the number')} {node.value!r}"


def text(node: yaml.Node) -> str:
    """Any scalar as written (numbers keep their digits: `8.0` stays "8.0")."""
    return str(_scalar(node, "a string").value)


def _whole(node: yaml.Node) -> int:
    scalar = _scalar(node, "a whole number")
    if _tag(scalar) != "int":
        raise Problem(f"expected a whole number, got {_kind(scalar)}", node)
    return int(_CONSTRUCTOR.construct_object(scalar))


def whole(node: yaml.Node) -> int:
    return _whole(node)


def count(node: yaml.Node) -> int:
    value = _whole(node)
    if value < 0:
        raise Problem(f"{value} must not be negative", node)
    return value


def boolean(node: yaml.Node) -> bool:
    scalar = _scalar(node, "true or false")
    if _tag(scalar) != "bool":
        raise Problem(f"expected true or false, got {_kind(scalar)}", node)
    return bool(_CONSTRUCTOR.construct_object(scalar))


def unit(parse: Callable[[str], int]) -> Callable[[yaml.Node], int]:
    """A value in the CLI flags' units ("10m", "16g", "2.5" credits), parsed from its text."""

    def convert(node: yaml.Node) -> int:
        scalar = _scalar(node, "a value")
        if _tag(scalar) not in ("int", "float", "str"):
            raise Problem(f"expected a value, got {_kind(scalar)}", node)
        try:
            return parse(str(scalar.value))
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise Problem(str(exc), node) from None

    return convert


def _items(node: yaml.Node) -> list[yaml.Node]:
    """A list's items; one scalar counts as a list of one."""
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    _scalar(node, "a list")
    return [node]


def texts(node: yaml.Node) -> list[str]:
    return [text(item) for item in _items(node)]


def wholes(node: yaml.Node) -> list[int]:
    return [whole(item) for item in _items(node)]


def words(node: yaml.Node) -> list[str]:
    """A command: a list of words, or one string split as a shell would."""
    if isinstance(node, yaml.SequenceNode):
        return texts(node)
    try:
        return shlex.split(text(node))
    except ValueError as exc:
        raise Problem(f"cannot split into words: {exc}", node) from None


def pairs(node: yaml.Node) -> list[tuple[str, str]]:
    """KEY: VALUE entries, or a list of "KEY=VALUE" strings as the flags take them."""
    if isinstance(node, yaml.MappingNode):
        return [(key, text(value)) for key, _, value in entries(node)]
    result = []
    for item in _items(node):
        try:
            result.append(units.parse_key_value(text(item)))
        except ValueError as exc:
            raise Problem(str(exc), item) from None
    return result


def entries(node: yaml.MappingNode) -> Iterator[tuple[str, yaml.Node, yaml.Node]]:
    """(key, key node, value node) of a mapping with string keys, refusing duplicates."""
    seen: dict[str, int] = {}
    for key_node, value in node.value:
        key = text(key_node)
        if key in seen:
            raise Problem(f"duplicate key {key!r} (first on line {seen[key]})", key_node)
        seen[key] = line_of(key_node)
        yield key, key_node, value


@dataclass(frozen=True)
class Field:
    """A job file field: how its value is read, the `jobs submit` option it stands for
    (argparse dest) and the JobSpec field the control plane names in its errors."""

    convert: Callable[[yaml.Node], Any]
    dest: str
    proto: str


FIELDS: dict[str, Field] = {
    "image": Field(text, "image", "image"),
    "command": Field(words, "job_command", "args"),
    "entrypoint": Field(text, "entrypoint", "command"),
    "gpus": Field(count, "gpus", "gpu_count"),
    "gpu_models": Field(texts, "gpu_model", "gpu_models"),
    "min_vram": Field(count, "min_vram", "min_vram_gib"),
    "min_compute_capability": Field(text, "min_compute_capability", "min_compute_capability"),
    "cpus": Field(unit(units.parse_cpus), "cpus", "cpu_millicores"),
    "memory": Field(unit(units.parse_size), "memory", "memory_bytes"),
    "shm_size": Field(unit(units.parse_size), "shm_size", "shm_bytes"),
    "max_duration": Field(unit(units.parse_duration), "max_duration", "max_duration_seconds"),
    "max_price": Field(
        unit(units.parse_credits), "max_price", "max_price_per_gpu_hour_micro_credits"
    ),
    "budget": Field(unit(units.parse_credits), "budget", "budget_micro_credits"),
    "env": Field(pairs, "env", "env"),
    "labels": Field(pairs, "label", "labels"),
    "inputs": Field(_items, "input", "inputs"),  # then resolved by _resolve_inputs
    "network": Field(boolean, "network", "network"),
    "host_labels": Field(pairs, "host_label", "host_labels"),
    "locations": Field(texts, "location", "locations"),
    "min_reliability": Field(unit(a.reliability), "min_reliability", "min_reliability_permille"),
    "priority": Field(whole, "priority", "priority"),
    "placement": Field(
        unit(lambda t: enum_value(types_pb2.PlacementPolicy, t)), "placement", "placement_policy"
    ),
    "max_retries": Field(count, "max_retries", "max_retries"),
    "retry_on_exit_codes": Field(wholes, "retry_on_exit_code", "retry_on_exit_codes"),
    "allow_simulated": Field(boolean, "allow_simulated", "allow_simulated"),
    "allow_unverified": Field(boolean, "allow_unverified", "allow_unverified"),
}
REQUIRED = ("image",)


@dataclass(frozen=True)
class Error:
    """One mistake in a job file, shown as `FILE:LINE: FIELD: message`."""

    path: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        named = f"{self.field}: " if self.field else ""
        return f"{where}: {named}{self.message}"


class JobFileError(Exception):
    """A job file with mistakes: all of them, in file order."""

    def __init__(self, errors: list[Error]) -> None:
        super().__init__("\n".join(map(str, errors)))
        self.errors = errors


@dataclass
class JobFile:
    """A checked job file: the `jobs submit` option values it sets, and where each is."""

    path: str
    options: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, yaml.Node] = field(default_factory=dict)
    values: dict[str, yaml.Node] = field(default_factory=dict)

    def error(self, name: str, message: str, node: yaml.Node | None = None) -> Error:
        """An Error at `node`, else at the field's key, else at the file (a default)."""
        at = node or self.keys.get(name)
        return Error(self.path, line_of(at) if at is not None else None, name, message)


def load(path: str) -> JobFile:
    """Reads and checks a job file; raises JobFileError naming every mistake."""
    try:
        source = Path(path).expanduser().read_text()
    except OSError as exc:
        raise JobFileError([Error(path, None, "", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise JobFileError([Error(path, None, "", "not UTF-8 text")]) from None
    try:
        root = yaml.compose(source, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "not valid YAML"
        raise JobFileError([Error(path, line, "", f"not valid YAML: {problem}")]) from None
    if root is None:
        raise JobFileError([Error(path, 1, "", "empty: a job file needs at least `image`")])
    if not isinstance(root, yaml.MappingNode):
        message = f"expected a mapping of fields (image: ..., gpus: ...), got {_kind(root)}"
        raise JobFileError([Error(path, line_of(root), "", message)])
    job = JobFile(path)
    errors = _read_fields(job, root)
    start = line_of(root)
    errors += [Error(path, start, name, "is required") for name in REQUIRED if name not in job.keys]
    if errors:
        raise JobFileError(sorted(errors, key=lambda e: e.line or 0))
    return job


def _read_fields(job: JobFile, root: yaml.MappingNode) -> list[Error]:
    errors: list[Error] = []
    for key_node, value in root.value:
        try:
            name = text(key_node)
        except Problem as exc:
            errors.append(job.error("", f"a field name must be a string: {exc.message}", key_node))
            continue
        spec = FIELDS.get(name)
        if name in job.keys:
            first = line_of(job.keys[name])
            errors.append(job.error(name, f"duplicate field (first on line {first})", key_node))
            continue
        if spec is None:
            errors.append(job.error(name, _unknown(name), key_node))
            continue
        job.keys[name], job.values[name] = key_node, value
        try:
            converted = spec.convert(value)
            if name == "inputs":
                converted = _resolve_inputs(job, value)
            job.options[spec.dest] = converted
        except Problem as exc:
            errors.append(job.error(name, exc.message, exc.node or value))
    return errors


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.6)
    if close:
        return f"unknown field; did you mean `{close[0]}`?"
    return f"unknown field (the fields are: {', '.join(FIELDS)})"


def _resolve_inputs(job: JobFile, node: yaml.Node) -> list[str]:
    """`KEY[:PATH]` strings or {key, path} mappings as --input takes them; a local file
    ("./x", "../x", "/x", "~/x") is found relative to the job file's folder and must exist."""
    result = []
    for item in _items(node):
        if isinstance(item, yaml.MappingNode):
            parts = dict(_input_parts(item))
            if "key" not in parts:
                raise Problem("an input mapping needs `key`", item)
            key, path = parts["key"], parts.get("path", "")
        else:
            key, _, path = text(item).partition(":")
        if data.is_local(key):
            local = Path(job.path).parent / Path(key).expanduser()
            if not local.is_file():
                raise Problem(f"{key}: no such file (relative to {job.path})", item)
            key = str(local.resolve())
        result.append(f"{key}:{path}" if path else key)
    return result


def _input_parts(node: yaml.MappingNode) -> Iterator[tuple[str, str]]:
    for key, key_node, value in entries(node):
        if key not in ("key", "path"):
            raise Problem(f"unknown input field {key!r} (an input has `key` and `path`)", key_node)
        value_text = text(value)
        if key == "key" and ":" in value_text:
            raise Problem("an input key cannot contain ':'", value)
        yield key, value_text


def apply_to(job: JobFile, defaults: argparse.Namespace) -> argparse.Namespace:
    """`defaults` (what `jobs submit --image IMAGE` parses to) with the file's values set."""
    merged = argparse.Namespace(**vars(defaults))
    for dest, value in job.options.items():
        setattr(merged, dest, value)
    return merged
