"""Pages and page tokens: the wire format clients hold stays as it was; a page says whether
another follows; a token this server did not issue is INVALID_ARGUMENT."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from controlplane.errors import InvalidArgument
from controlplane.paging import (
    MAX_PAGE_SIZE,
    PageRequest,
    after_id,
    encode_token,
    offset_of,
    page_by_offset,
    page_of,
    time_cursor,
    time_token,
)


def test_tokens_keep_their_wire_format() -> None:
    # Tokens issued before pages moved into the repositories must still be understood.
    assert encode_token({"after": "host_1"}) == "eyJhZnRlciI6Imhvc3RfMSJ9"
    assert encode_token({"offset": 20}) == "eyJvZmZzZXQiOjIwfQ"
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert encode_token(time_token(when, "job_1")) == (
        "eyJpZCI6ImpvYl8xIiwidCI6IjIwMjYtMDEtMDJUMDM6MDQ6MDUrMDA6MDAifQ"
    )
    assert time_cursor(encode_token(time_token(when, "job_1"))) == (when, "job_1")
    assert after_id("eyJhZnRlciI6Imhvc3RfMSJ9") == "host_1"
    assert offset_of("eyJvZmZzZXQiOjIwfQ") == 20


def test_page_of_reads_one_extra_row_to_know_more_follow() -> None:
    rows = ["a", "b", "c"]
    full = page_of(rows, 2, lambda r: {"after": r})
    assert full.items == ["a", "b"]
    assert after_id(full.next_cursor) == "b"
    last = page_of(rows, 3, lambda r: {"after": r})
    assert last.items == rows
    assert last.next_cursor == ""
    assert page_of([], 3, lambda r: {"after": r}).next_cursor == ""


def test_page_by_offset_walks_to_the_end() -> None:
    items = list(range(5))
    seen: list[int] = []
    token = ""
    while True:
        page = page_by_offset(items, offset_of(token), 2)
        seen.extend(page.items)
        token = page.next_cursor
        if not token:
            break
    assert seen == items


def test_page_request_limits() -> None:
    assert PageRequest().limit == 50
    assert PageRequest(size=10**6).limit == MAX_PAGE_SIZE
    assert PageRequest(size=3).limit == 3


@pytest.mark.parametrize(
    "token",
    ["!!!", encode_token({"offset": -1}), encode_token({"offset": 1.5}), "a"],
)
def test_foreign_offset_tokens_are_invalid(token: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        offset_of(token)
    assert caught.value.field == "page_token"


@pytest.mark.parametrize(
    "token",
    [encode_token({"t": "not a time", "id": "x"}), encode_token({"after": None}), "===="],
)
def test_foreign_keyset_tokens_are_invalid(token: str) -> None:
    with pytest.raises(InvalidArgument):
        time_cursor(token)
    with pytest.raises(InvalidArgument):
        after_id(token)
