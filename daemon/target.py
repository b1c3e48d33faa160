"""gRPC channel targets for one or several control-plane addresses (failover in order)."""

from __future__ import annotations

import ipaddress
import socket


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"control-plane address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def first_host(addresses: str) -> str:
    """The host of the first of "HOST:PORT[,HOST:PORT…]" (the name TLS verifies)."""
    return _split(addresses.split(",")[0])[0]


def grpc_target(addresses: str) -> str:
    """The channel target for "HOST:PORT[,HOST:PORT…]".

    One address is used as given (gRPC resolves it itself). Several become gRPC's static
    address list ("ipv4:a:p,b:p" or "ipv6:[a]:p,[b]:p"), with names resolved here once, so
    the channel's pick_first policy connects to the first that answers and moves to the next
    when that one goes away: a control-plane replica that dies is not a client outage."""
    parts = [a for a in (p.strip() for p in addresses.split(",")) if a]
    if not parts:
        raise ValueError("no control-plane address given")
    if len(parts) == 1:
        return parts[0]  # any target gRPC understands (a name, unix:, dns:///…)
    resolved: list[tuple[int, str, int]] = []
    for part in parts:
        host, port = _split(part)
        try:
            literal = ipaddress.ip_address(host)
            resolved.append((literal.version, str(literal), port))
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ValueError(f"cannot resolve control-plane host {host!r}: {exc}") from exc
        for family, _, _, _, sockaddr in infos:
            version = 6 if family == socket.AF_INET6 else 4
            resolved.append((version, str(sockaddr[0]), port))
    versions = {v for v, _, _ in resolved}
    if versions == {6}:
        return "ipv6:" + ",".join(f"[{h}]:{p}" for _, h, p in dict.fromkeys(resolved))
    # gRPC takes one family per list: IPv4 when any address has one.
    return "ipv4:" + ",".join(f"{h}:{p}" for v, h, p in dict.fromkeys(resolved) if v == 4)
