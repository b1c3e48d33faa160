"""Rendering for the CLI: aligned tables and key/value blocks for humans, JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC
from typing import Any, TextIO

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import types_pb2

Cell = str | int | None


def table(headers: Sequence[str], rows: Iterable[Sequence[Cell]]) -> str:
    """Columns padded to their widest cell, two spaces apart; the last column is not padded."""
    grid = [[str(h) for h in headers]] + [
        ["" if cell is None else str(cell) for cell in row] for row in rows
    ]
    widths = [max(len(line[i]) for line in grid) for i in range(len(headers))]
    lines = []
    for line in grid:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(line[:-1])] + [line[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, Cell]]) -> str:
    """A "Key: value" block with the values aligned; pairs with a None value are left out."""
    shown = [(k, str(v)) for k, v in pairs if v is not None]
    if not shown:
        return ""
    width = max(len(k) for k, _ in shown) + 1
    return "\n".join(f"{(k + ':').ljust(width)}  {v}" for k, v in shown)


def message_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data: proto field names, enum names, int64 as strings."""
    return MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


def print_json(
    data: Message | Sequence[Message] | Mapping[str, Any], out: TextIO | None = None
) -> None:
    """Prints a message, a list of messages or plain data as indented JSON."""
    stream = out or sys.stdout
    if isinstance(data, Message):
        payload: Any = message_dict(data)
    elif isinstance(data, Mapping):
        payload = dict(data)
    else:
        payload = [message_dict(m) for m in data]
    stream.write(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def print_json_line(message: Message, out: TextIO | None = None) -> None:
    """One message as one line of JSON (for streams: NDJSON)."""
    stream = out or sys.stdout
    stream.write(json.dumps(message_dict(message), separators=(",", ":")) + "\n")
    stream.flush()


def enum_name(enum: Any, value: int) -> str:
    """An enum value without its type prefix: JOB_STATE_RUNNING → RUNNING."""
    try:
        name = str(enum.Name(value))
    except ValueError:
        return str(value)
    prefix = _enum_prefix(enum)
    return name[len(prefix) :] if name.startswith(prefix) else name


def enum_value(enum: Any, text: str) -> int:
    """Parses an enum value by its short or full name, case-insensitively."""
    wanted = text.strip().upper().replace("-", "_")
    prefix = _enum_prefix(enum)
    for name in enum.keys():
        if name in (wanted, prefix + wanted) and not name.endswith("_UNSPECIFIED"):
            return int(enum.Value(name))
    choices = ", ".join(short_names(enum))
    raise ValueError(f"{text!r} is not one of: {choices}")


def short_names(enum: Any) -> list[str]:
    """The enum's short names in lower case, without UNSPECIFIED."""
    prefix = _enum_prefix(enum)
    return [n[len(prefix) :].lower() for n in enum.keys() if not n.endswith("_UNSPECIFIED")]


def _enum_prefix(enum: Any) -> str:
    first = next((n for n in enum.keys() if n.endswith("_UNSPECIFIED")), "")
    return first[: -len("UNSPECIFIED")] if first else ""


def when(ts: Timestamp) -> str:
    """A timestamp as UTC "2026-11-23 10:00:00Z"; empty when unset (zero)."""
    if ts.seconds == 0 and ts.nanos == 0:
        return ""
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def role_name(role: int) -> str:
    return enum_name(types_pb2.Role, role).lower()


def gpu_summary(gpus: Sequence[types_pb2.Gpu]) -> str:
    """ "2× NVIDIA A100-SXM4-80GB" (grouped by model) for a host's GPU list."""
    counts: dict[str, int] = {}
    for gpu in gpus:
        counts[gpu.name] = counts.get(gpu.name, 0) + 1
    return ", ".join(f"{n}× {name}" for name, n in counts.items()) or "-"
