"""Request fingerprints for idempotency keys: same key and same body replay, else conflict."""

from __future__ import annotations

import hashlib

from google.protobuf.message import Message

from controlplane.errors import AlreadyExists, InvalidArgument

MAX_KEY_LENGTH = 200


def fingerprint(message: Message) -> str:
    """SHA-256 of the message's deterministic encoding, idempotency_key field cleared."""
    copy = type(message)()
    copy.CopyFrom(message)
    if "idempotency_key" in copy.DESCRIPTOR.fields_by_name:
        copy.ClearField("idempotency_key")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def check_key(key: str) -> str | None:
    """The key, or None when absent; rejects keys a client could not have meant."""
    if not key:
        return None
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidArgument("idempotency_key", f"longer than {MAX_KEY_LENGTH} characters")
    if not key.isprintable():
        raise InvalidArgument("idempotency_key", "contains non-printable characters")
    return key


def ensure_same(stored_hash: str | None, request_hash: str, key: str) -> None:
    """Raises ALREADY_EXISTS when a key is reused with a different request."""
    if stored_hash != request_hash:
        raise AlreadyExists(f"idempotency_key {key!r} was already used with a different request")
