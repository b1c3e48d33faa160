"""Tunnel settings (exec, port-forward), mixed into the control plane's Settings."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings


class TunnelFields(BaseSettings):
    """Where daemons call this replica back for a tunnel, and how long it waits for them
    (controlplane/tunnels)."""

    advertise_address: str = Field(
        default="",
        description="host:port daemons reach this replica's gRPC API at, named in the "
        "tunnel commands (exec, port-forward) it sends them so that they call it back. "
        "Empty: the listen address with the port it got (a wildcard host becomes this "
        "machine's name).",
    )
    tunnel_data_address: str = Field(
        default="127.0.0.1:0",
        description="host:port of this replica's tunnel data port: the raw connections that "
        "carry port-forward and gateway bytes (PortForwardStart.raw) from clients and "
        "daemons, each claimed by a one-time token; TLS with the gRPC API's certificate when "
        "it serves TLS. Port 0 picks a free one; a wildcard host is advertised as the "
        "advertise_address's host (else this machine's name). Empty: no data port (raw "
        "port-forwards fail with FAILED_PRECONDITION).",
    )
    tunnel_open_timeout_ms: int = Field(
        default=5000,
        gt=0,
        description="How long an exec or port-forward waits for the host's daemon to call "
        "back before it fails with UNAVAILABLE, in milliseconds.",
    )
