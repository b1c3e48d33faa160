"""Rendering for the CLI: aligned tables and key/value blocks for humans, JSON for scripts."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC
from typing import Any, TextIO, TypeVar

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import types_pb2

MessageT = TypeVar("MessageT", bound=Message)

Cell = str | int | None

# Job and host ids: shown as their shortest unique prefix on a terminal (ids.resolve takes it).
FULL_ID = re.compile(r"(?:job|host)_[0-9a-f]{32}")
# Ids keep at least this many characters after `job_`/`host_` (Nomad shows 8).
SHORT_LEN = 8
# The colour of a state (the first word of a STATE cell) on a terminal.
STATE_STYLES = {
    **dict.fromkeys(("QUEUED", "SCHEDULED", "STARTING", "REGISTERED"), "cyan"),
    **dict.fromkeys(("RUNNING", "UPLOADING", "ONLINE"), "green"),
    "SUCCEEDED": "bold green",
    **dict.fromkeys(("FAILED", "LOST", "REJECTED", "TIMED_OUT"), "red"),
    **dict.fromkeys(("DRAINING", "DRAINED", "PENDING"), "yellow"),
    "CANCELLED": "magenta",
}
_GAP = 2  # spaces between columns
_MIN_COLUMN = 6  # a column is not squeezed below this (or its header, or its widest cell)


def print_key_secret(secret: str) -> None:
    """A created key's secret on stdout (said once on stderr), or, for an idempotent replay
    (no secret), where it went."""
    if secret:
        print(secret)
        print("(the secret is shown only this once)", file=sys.stderr)
    else:
        print(
            "(an idempotent replay: the secret was shown when the key was created)", file=sys.stderr
        )


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether output goes to a person: a terminal, and neither TERM=dumb nor a pipe."""
    out = stream or sys.stdout
    return out.isatty() and os.environ.get("TERM", "") != "dumb"


def table(headers: Sequence[str], rows: Iterable[Sequence[Cell]]) -> str:
    """A table. On a terminal (rich): as wide as the terminal at most, the widest columns cut
    with "…" rather than wrapped, job and host ids shortened to unique prefixes, states in
    colour. Elsewhere (pipes, tests): plain text with full ids, as `plain_table`."""
    grid = [["" if cell is None else str(cell) for cell in row] for row in rows]
    if not is_terminal():
        return plain_table(headers, grid)
    return _rich_table([str(h) for h in headers], grid, shutil.get_terminal_size().columns)


def plain_table(headers: Sequence[str], rows: Iterable[Sequence[Cell]]) -> str:
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


def _rich_table(headers: list[str], grid: list[list[str]], width: int) -> str:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    shown = short_ids(cell for row in grid for cell in row if FULL_ID.fullmatch(cell))
    states = [i for i, h in enumerate(headers) if h == "STATE"]
    # Ids and states are what a row is read by: they are never cut.
    whole = {i for row in grid for i, cell in enumerate(row) if cell in shown} | set(states)
    grid = [[shown.get(cell, cell) for cell in row] for row in grid]
    natural = [max([len(h)] + [len(row[i]) for row in grid]) for i, h in enumerate(headers)]
    floors = [
        n if i in whole else min(n, max(len(h), _MIN_COLUMN))
        for i, (n, h) in enumerate(zip(natural, headers, strict=True))
    ]
    widths = fit_widths(natural, floors, width - _GAP * (len(headers) - 1))
    out = Table(box=None, pad_edge=False, padding=(0, _GAP // 2), header_style="bold")
    for header, column_width in zip(headers, widths, strict=True):
        out.add_column(header, width=column_width, no_wrap=True, overflow="ellipsis")
    for row in grid:
        cells = [Text(cell) for cell in row]
        for i in states:
            cells[i].stylize(STATE_STYLES.get(row[i].split(" ")[0], ""))
        out.add_row(*cells)
    buffer = io.StringIO()
    Console(file=buffer, force_terminal=True, width=width, soft_wrap=False).print(out)
    return "\n".join(line.rstrip() for line in buffer.getvalue().rstrip("\n").splitlines())


def fit_widths(natural: Sequence[int], floors: Sequence[int], room: int) -> list[int]:
    """Column widths that fit in `room`: the widest column gives up a character at a time
    (none below its floor) until the row fits or none can."""
    widths = list(natural)
    while sum(widths) > room:
        shrinkable = [i for i, w in enumerate(widths) if w > floors[i]]
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: widths[i])
        widths[widest] -= 1
    return widths


def short_ids(ids: Iterable[str]) -> dict[str, str]:
    """Each id → its shortest prefix (at least `SHORT_LEN` characters past its `kind_`) that
    no other of `ids` shares, as Nomad shows them."""
    unique = sorted(set(ids))
    shown: dict[str, str] = {}
    for i, full in enumerate(unique):
        kind = full.partition("_")[0]
        neighbours = unique[max(i - 1, 0) : i] + unique[i + 1 : i + 2]
        common = max((_common_length(full, other) for other in neighbours), default=0)
        shown[full] = full[: max(len(kind) + 1 + SHORT_LEN, common + 1)]
    return shown


def _common_length(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


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


def print_shown(item: MessageT, render: Callable[[MessageT], str], *, json_out: bool) -> None:
    """One resource as JSON or as the text `render` draws (what `get`-like commands print)."""
    if json_out:
        print_json(item)
    else:
        print(render(item))


def print_listing(
    items: Sequence[MessageT],
    render: Callable[[Sequence[MessageT]], str],
    *,
    json_out: bool,
    more: bool,
    limit: int,
    noun: str,
) -> None:
    """A listing as JSON or as the table `render` draws, saying on stderr when `--limit` cut
    it (`more`: the server had more than `limit` `noun`)."""
    if json_out:
        print_json(items)
        return
    print(render(items))
    if more:
        print(f"(more than {limit} {noun}: --limit 0 lists all)", file=sys.stderr)


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
