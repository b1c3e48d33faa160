"""What a CreateSession asks for, checked field by field, as the JobSpec the session runs."""

from __future__ import annotations

import base64
import binascii
import re

from gpuplane.v1 import types_pb2

from controlplane.errors import InvalidArgument

# A session lasts 1 s to 12 hours from its start, extensions included (the daemon enforces
# the same maximum itself: daemon/sessions.MAX_SESSION_SECONDS).
MAX_SESSION_SECONDS = 12 * 3600
MAX_KEYS = 10
MAX_KEY_LENGTH = 16 * 1024
# The key types OpenSSH's sshd accepts in authorized_keys.
KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
_COMMENT = re.compile(r"^[\x20-\x7e]*$")
# Fields of a job's spec a session decides itself (its duration, hold and retries).
_SESSION_OWNED = (
    ("max_duration_seconds", "a session lasts duration_seconds"),
    ("budget_micro_credits", "a session is held for its duration × GPUs × price"),
    ("retry_on_exit_codes", "a session is not retried"),
)


def validate_duration(field: str, seconds: int, already: int = 0) -> None:
    """`seconds` (added to `already`) within 1 s … 12 hours, else InvalidArgument."""
    if seconds <= 0:
        raise InvalidArgument(field, "must be at least 1 second (the CLI's --hours: 0 < H <= 12)")
    if already + seconds > MAX_SESSION_SECONDS:
        what = f"the session's {already} s and {seconds} s more" if already else "it"
        raise InvalidArgument(
            field, f"{what} would exceed the 12-hour maximum ({MAX_SESSION_SECONDS} s)"
        )


def validate_ssh_key(field: str, key: str) -> str:
    """One OpenSSH public key ("type base64 [comment]"), normalised to one line."""
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidArgument(field, f"longer than {MAX_KEY_LENGTH} characters")
    parts = key.strip().split(None, 2)
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        raise InvalidArgument(
            field, "not an OpenSSH public key: expected 'ssh-ed25519|ssh-rsa|ecdsa-… BASE64'"
        )
    kind, body = parts[0], parts[1]
    try:
        blob = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(field, "the key's body is not base64") from None
    # The blob opens with the key type as an SSH string (4-byte length, then the name).
    if blob[4 : 4 + len(kind)] != kind.encode() or len(blob) < 4 + len(kind) + 4:
        raise InvalidArgument(field, f"the key's body is not a {kind} key")
    comment = parts[2] if len(parts) > 2 else ""
    if not _COMMENT.match(comment):
        raise InvalidArgument(field, "the key's comment must be printable ASCII")
    return " ".join(p for p in (kind, body, comment) if p)


def session_spec(
    spec: types_pb2.JobSpec, duration_seconds: int, keys: list[str]
) -> types_pb2.JobSpec:
    """The job spec of a new session: `spec` with its duration, no retries and its keys; the
    fields a session decides itself must be unset (InvalidArgument naming them)."""
    validate_duration("duration_seconds", duration_seconds)
    for name, why in _SESSION_OWNED:
        value = getattr(spec, name)
        if value:
            raise InvalidArgument(f"spec.{name}", f"must be unset: {why}")
    if spec.HasField("max_retries") and spec.max_retries:
        raise InvalidArgument("spec.max_retries", "must be unset: a session is not retried")
    if spec.HasField("session"):
        raise InvalidArgument("spec.session", "must be unset: give ssh_public_keys instead")
    if len(keys) > MAX_KEYS:
        raise InvalidArgument("ssh_public_keys", f"more than {MAX_KEYS} keys")
    checked = [validate_ssh_key(f"ssh_public_keys[{i}]", key) for i, key in enumerate(keys)]
    made = types_pb2.JobSpec()
    made.CopyFrom(spec)
    made.max_duration_seconds = duration_seconds
    made.max_retries = 0  # its host lost, it is over: a new container is not the session
    made.session.SetInParent()  # a session even without keys
    made.session.ssh_public_keys.extend(checked)
    return made
