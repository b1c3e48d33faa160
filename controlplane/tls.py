"""TLS of the control plane's gRPC API: server credentials from the configured PEM files."""

from __future__ import annotations

from pathlib import Path

import grpc

from controlplane.settings import Settings
from messaging.tls import TlsConfigError

__all__ = ["TlsConfigError", "server_credentials"]


def _read(path: Path, setting: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"{setting}: {path} holds no PEM data")
    return data


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The gRPC server credentials, or None to serve plaintext (allowed by the settings)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        if not settings.allow_plaintext:
            raise TlsConfigError(
                "no TLS certificate: set GPUPLANE_TLS_CERT_FILE and GPUPLANE_TLS_KEY_FILE, "
                "or GPUPLANE_ALLOW_PLAINTEXT=true to serve without TLS (dev stacks only)"
            )
        return None
    chain = _read(settings.tls_cert_file, "tls_cert_file")
    key = _read(settings.tls_key_file, "tls_key_file")
    client_ca = (
        _read(settings.tls_client_ca_file, "tls_client_ca_file")
        if settings.tls_client_ca_file is not None and settings.tls_client_auth == "require"
        else None
    )
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=client_ca,
        require_client_auth=settings.tls_client_auth == "require",
    )
