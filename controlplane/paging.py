"""Pages of List methods: the Page a repository returns, page sizes, and the opaque page
tokens (their wire format is fixed: clients keep tokens between calls)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from controlplane.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PageRequest:
    """What a List request asks for: the token of the previous page ("" for the first) and a
    size (0 for the default)."""

    token: str = ""
    size: int = 0

    @property
    def limit(self) -> int:
        return page_size(self.size)


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing; `next_cursor` is the token of the next page, "" on the last."""

    items: list[T]
    next_cursor: str = ""


def page_size(requested: int) -> int:
    """The effective page size: 0 means the default, anything larger is capped."""
    if requested <= 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def page_of(rows: Sequence[T], limit: int, cursor_of: Callable[[T], dict[str, Any]]) -> Page[T]:
    """The page in `rows`, read with `limit + 1`: the extra row only says that more follow;
    the next page resumes after the last row kept (`cursor_of` names it)."""
    items = list(rows[:limit])
    more = len(rows) > limit
    return Page(items, encode_token(cursor_of(items[-1])) if more else "")


async def paginate(
    session: AsyncSession,
    query: Select[T],
    limit: int,
    cursor_of: Callable[[T], dict[str, Any]],
) -> Page[T]:
    """Runs an ordered, filtered `query` for one page of `limit` rows."""
    rows = (await session.scalars(query.limit(limit + 1))).all()
    return page_of(rows, limit, cursor_of)


async def page_by_id(
    session: AsyncSession,
    query: Select[T],
    id_column: InstrumentedAttribute[str],
    page: PageRequest,
    id_of: Callable[[T], str],
) -> Page[T]:
    """A page of `query` in id order, resuming after the id in an `{"after": id}` token."""
    after = after_id(page.token)
    if after:
        query = query.where(id_column > after)
    return await paginate(
        session, query.order_by(id_column), page.limit, lambda row: {"after": id_of(row)}
    )


async def page_newest_first(
    session: AsyncSession,
    query: Select[T],
    columns: tuple[InstrumentedAttribute[datetime], InstrumentedAttribute[str]],
    page: PageRequest,
    key_of: Callable[[T], tuple[datetime, str]],
) -> Page[T]:
    """A page of `query`, newest first by (time, id), resuming after the row of a
    `{"t": time, "id": id}` token."""
    when, row_id = columns
    before = time_cursor(page.token)
    if before:
        query = query.where((when < before[0]) | ((when == before[0]) & (row_id < before[1])))
    return await paginate(
        session,
        query.order_by(when.desc(), row_id.desc()),
        page.limit,
        lambda row: time_token(*key_of(row)),
    )


def offset_of(token: str) -> int:
    """The offset an `{"offset": n}` token resumes at, 0 for the first page."""
    cursor = decode_token(token)
    offset = cursor.get("offset", 0) if cursor else 0
    if not isinstance(offset, int) or offset < 0:
        raise _not_ours()
    return offset


def page_by_offset(items: Sequence[T], offset: int, limit: int) -> Page[T]:
    """The page of a list built in memory that starts at `offset` (from offset_of())."""
    end = offset + limit
    return Page(list(items[offset:end]), encode_token({"offset": end}) if end < len(items) else "")


def time_token(when: datetime, row_id: str) -> dict[str, Any]:
    """The cursor of a newest-first listing that resumes after (when, row_id)."""
    return {"t": when.isoformat(), "id": row_id}


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
        raise _not_ours() from None
    if not isinstance(cursor, dict):
        raise _not_ours()
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
