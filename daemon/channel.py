"""gRPC channels to the control plane: TLS verifying the server by default, plaintext on request."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from daemon.target import first_host, grpc_target


class ChannelConfigError(ValueError):
    """The channel's TLS settings cannot be used; the message names the file or option."""


@dataclass(frozen=True)
class ChannelSecurity:
    """How a client reaches the control plane. TLS unless `plaintext`: the server is verified
    against `ca_file` (unset = the system's roots); `cert_file`/`key_file` are the client
    certificate a control plane with client auth asks daemons for."""

    plaintext: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ChannelConfigError("a client certificate needs its key: give both or neither")
        if self.plaintext and (self.ca_file or self.cert_file or self.server_name):
            raise ChannelConfigError("plaintext and TLS files exclude each other")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return path.read_bytes()
            except OSError as exc:
                raise ChannelConfigError(f"{what} {path}: {exc.strerror}") from None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file, "CA file"),
            private_key=read(self.key_file, "client key"),
            certificate_chain=read(self.cert_file, "client certificate"),
        )

    def raw_context(self) -> ssl.SSLContext | None:
        """The same trust for a raw connection to a tunnel data port; None when plaintext."""
        if self.plaintext:
            return None
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            if self.cert_file is not None:
                context.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ChannelConfigError(f"TLS files: {exc}") from None
        return context


PLAINTEXT = ChannelSecurity(plaintext=True)
# HTTP/2 frames this end accepts up to 1 MiB (the default, 16 KiB, cuts each 256 KiB tunnel
# frame into 16, each parsed and accounted on its own); the control plane's server says the
# same (controlplane/server.py).
TRANSPORT_OPTIONS: tuple[tuple[str, Any], ...] = (("grpc.http2.max_frame_size", 1 << 20),)


def open_channel(
    addresses: str, security: ChannelSecurity, options: Sequence[tuple[str, Any]] = ()
) -> aio.Channel:
    """A channel to "HOST:PORT[,HOST:PORT…]" (see grpc_target for failover)."""
    target = grpc_target(addresses)
    if security.plaintext:
        return aio.insecure_channel(target, options=[*TRANSPORT_OPTIONS, *options])
    extra = [*TRANSPORT_OPTIONS, *options]
    # Several addresses become an ipv4:/ipv6: list of resolved IPs, whose authority names no
    # host: verify every replica's certificate against the first address's host instead.
    name = security.server_name or ("" if target == addresses.strip() else first_host(addresses))
    if name:
        extra.append(("grpc.ssl_target_name_override", name))
    return aio.secure_channel(target, security.credentials(), options=extra)
