"""Id prefix matching (short ids, as Nomad takes them): validation and an indexable condition."""

from __future__ import annotations

import re

from sqlalchemy import ColumnElement, and_
from sqlalchemy.orm import InstrumentedAttribute

from controlplane.errors import InvalidArgument

# Ids are `<kind>_<32 hex>` (db.base.new_id); a prefix is drawn from the same alphabet.
ALPHABET = "0123456789_abcdefghijklmnopqrstuvwxyz"  # in byte (C collation) order
_PREFIX = re.compile(r"[0-9a-z_]{1,40}")


def validate_id_prefix(field: str, prefix: str) -> str:
    """The prefix unchanged, or InvalidArgument naming `field`."""
    if not _PREFIX.fullmatch(prefix):
        raise InvalidArgument(field, "1 to 40 of a-z, 0-9 and _ (the start of an id)")
    return prefix


def upper_bound(prefix: str) -> str | None:
    """The least string of the alphabet above every string starting with `prefix` (None when
    there is none: all z). A bound in the alphabet, not `chr(ord(c) + 1)`, so that it sorts
    the same under a linguistic collation (where punctuation weighs nothing) as under C."""
    stem = prefix
    while stem:
        last = ALPHABET.index(stem[-1])
        if last + 1 < len(ALPHABET):
            return stem[:-1] + ALPHABET[last + 1]
        stem = stem[:-1]
    return None


def starts_with(column: InstrumentedAttribute[str], prefix: str) -> ColumnElement[bool]:
    """`column` starts with `prefix`: a range the primary key's btree serves (`id >= p AND
    id < next(p)`), and the literal LIKE (`_` escaped) that makes it exact on any collation
    and on SQLite, whose LIKE ignores case."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    conditions = [column >= prefix, column.like(escaped + "%", escape="\\")]
    bound = upper_bound(prefix)
    if bound is not None:
        conditions.append(column < bound)
    return and_(*conditions)
