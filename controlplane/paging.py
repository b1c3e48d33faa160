"""Opaque page tokens and page-size limits shared by every List method."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Any

from controlplane.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def page_size(requested: int) -> int:
    """The effective page size: 0 means the default, anything larger is capped."""
    if requested <= 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def encode_token(cursor: dict[str, Any]) -> str:
    raw = json.dumps(cursor, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> dict[str, Any] | None:
    """The cursor in `token`, None for the first page; a malformed token is INVALID_ARGUMENT."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        cursor = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token", "is not a token this server issued") from None
    if not isinstance(cursor, dict):
        raise InvalidArgument("page_token", "is not a token this server issued")
    return cursor


def _not_ours() -> InvalidArgument:
    return InvalidArgument("page_token", "is not a token this server issued")


def after_id(token: str) -> str | None:
    """The id a `{"after": id}` token resumes after, None for the first page."""
    cursor = decode_token(token)
    if cursor is None:
        return None
    after = cursor.get("after")
    if not isinstance(after, str):
        raise _not_ours()
    return after


def time_cursor(token: str) -> tuple[datetime, str] | None:
    """The (time, id) a `{"t": iso time, "id": id}` token resumes from, None for the first
    page. The time is always timezone-aware, as the rows it is compared with are."""
    cursor = decode_token(token)
    if cursor is None:
        return None
    when, row_id = cursor.get("t"), cursor.get("id")
    if not isinstance(when, str) or not isinstance(row_id, str):
        raise _not_ours()
    try:
        moment = datetime.fromisoformat(when)
    except ValueError:
        raise _not_ours() from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment, row_id
