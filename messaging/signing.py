"""Ed25519 signatures of hosts and the control plane: keys, signed bytes, the report header."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

# NATS header of a job report: base64 of the host's Ed25519 signature of the message's data
# (the serialized JobReport, exactly the bytes the control plane decodes).
SIGNATURE_HEADER = "Gpuplane-Signature"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class SigningKey:
    """One Ed25519 private key; its public half is 32 raw bytes."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_bytes = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def seed(self) -> bytes:
        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def header(self, data: bytes) -> str:
        """The value of SIGNATURE_HEADER for a message carrying `data`."""
        return base64.b64encode(self.sign(data)).decode()

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        """The key kept (base64 seed, mode 0600) in `path`, created there the first time."""
        try:
            return cls.from_seed(base64.b64decode(path.read_text().strip(), validate=True))
        except FileNotFoundError:
            pass
        key = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_name(f".{path.name}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, base64.b64encode(key.seed()) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        return key


def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Whether `signature` is `public_key`'s Ed25519 signature of `data`."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except InvalidSignature:
        return False
    return True


def decode_signature(header: str | None) -> bytes | None:
    """The signature in a SIGNATURE_HEADER value; None when absent or not base64."""
    if not header:
        return None
    try:
        return base64.b64decode(header, validate=True)
    except ValueError:
        return None


def canonical(document: Any) -> bytes:
    """The bytes a JSON document is signed as: sorted keys, no spaces, UTF-8."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
