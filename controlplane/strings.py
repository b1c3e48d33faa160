"""Control characters in stored strings: refused in requests, replaced in daemon reports."""

from __future__ import annotations

import functools
import re
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from controlplane.errors import InvalidArgument

# C0 controls, DEL and C1 controls. PostgreSQL's text cannot hold NUL at all, and the others
# corrupt terminals, logs and tables wherever the string is shown again.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# The same without tab, newline and carriage return.
CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Request fields whose values are multi-line text by nature (a container's command, arguments
# and environment: `sh -c` scripts, certificates): they may hold tab, newline and carriage
# return, never NUL or another control character. A map field counts for its values only.
MULTILINE_FIELDS = frozenset(
    {
        "gpuplane.v1.JobSpec.command",
        "gpuplane.v1.JobSpec.args",
        "gpuplane.v1.JobSpec.env",
        "gpuplane.v1.ExecStart.command",
    }
)
REPLACEMENT = "\ufffd"


def _check(path: str, value: str, lines_allowed: bool) -> None:
    found = (CONTROL_BUT_LINES if lines_allowed else CONTROL).search(value)
    if found is not None:
        code = ord(found.group())
        what = "a NUL character" if code == 0 else f"control character U+{code:04X}"
        raise InvalidArgument(path, f"contains {what}; strings may not hold control characters")


def check_text(message: Message, prefix: str = "") -> None:
    """Raises InvalidArgument naming the first string field of `message` (at any depth, map
    keys and values included) that holds a NUL or control character. Only the fields that can
    hold a string are visited (`_text_fields`): a telemetry batch's numbers cost nothing."""
    for field in _text_fields(message.DESCRIPTOR):
        path = f"{prefix}{field.name}"
        lines = field.full_name in MULTILINE_FIELDS
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            for key, item in getattr(message, field.name).items():
                shown = f"{path}[{key!r}]"
                if isinstance(key, str):
                    _check(shown, key, False)
                _check_one(shown, value_field, item, lines)
        elif field.is_repeated:
            for i, item in enumerate(getattr(message, field.name)):
                _check_one(f"{path}[{i}]", field, item, lines)
        elif entry is None or message.HasField(field.name):
            _check_one(path, field, getattr(message, field.name), lines)


@functools.cache
def _text_fields(descriptor: Descriptor) -> tuple[FieldDescriptor, ...]:
    """The fields of a message type that are strings or can contain one, in field order."""
    return tuple(f for f in descriptor.fields if _may_hold_text(f, frozenset({descriptor})))


def _may_hold_text(field: FieldDescriptor, seen: frozenset[Descriptor]) -> bool:
    if field.type == FieldDescriptor.TYPE_STRING:
        return True
    entry = field.message_type
    if entry is None:
        return False
    if entry in seen:
        return True  # a recursive type: visit it, its instances decide
    return any(_may_hold_text(f, seen | {entry}) for f in entry.fields)


def _check_one(path: str, field: FieldDescriptor, value: Any, lines: bool) -> None:
    if field.type == FieldDescriptor.TYPE_STRING:
        if value:
            _check(path, value, lines)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        check_text(value, f"{path}.")


def scrub(text: str) -> str:
    """`text` with each control character but tab, newline and carriage return replaced."""
    return CONTROL_BUT_LINES.sub(REPLACEMENT, text)


def scrub_text(message: Message) -> None:
    """Replaces, in place, the control characters of every string of `message` (nested
    messages and lists included): for what must be stored and cannot be refused, such as a
    daemon's report of how an attempt ended."""
    for field, value in message.ListFields():
        entry = field.message_type
        if entry is not None:
            if entry.GetOptions().map_entry:
                continue  # no report carries a map
            for item in value if field.is_repeated else [value]:
                scrub_text(item)
        elif field.type != FieldDescriptor.TYPE_STRING:
            continue
        elif field.is_repeated:
            value[:] = [scrub(item) for item in value]
        else:
            setattr(message, field.name, scrub(value))
