"""TLS for NATS connections: the ssl.SSLContext nats-py's `tls=` takes, from PEM files."""

from __future__ import annotations

import ssl
from pathlib import Path


class TlsConfigError(Exception):
    """A configured certificate, key or CA file cannot be used; the message names it."""


def nats_tls_context(
    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext | None:
    """A client context verifying the server against `ca_file` (else the system's roots) and
    presenting `cert_file`/`key_file` when given; None when nothing is configured, which
    leaves nats-py to use the system's roots for servers that require TLS (or tls:// URLs)."""
    if ca_file is None and cert_file is None:
        return None
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"NATS CA file {ca_file}: {exc}") from None
    if cert_file is not None:
        try:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"NATS client certificate {cert_file}: {exc}") from None
    return context
