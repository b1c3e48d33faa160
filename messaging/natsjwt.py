"""NATS decentralized auth: nkeys, operator/account/user JWTs, .creds text, the server include.

JWTs are `header.claims.signature` (base64url, no padding) signed with the issuer's ed25519
nkey, as nats-io/jwt v2 writes them; `jti` is the base32 sha256 of the claims without it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import nkeys

from messaging.subjects import (
    DISPATCH_STREAM,
    dispatch_durable,
    dispatch_subject,
    events_prefix,
    logs_prefix,
)

OPERATOR = nkeys.PREFIX_BYTE_OPERATOR
ACCOUNT = nkeys.PREFIX_BYTE_ACCOUNT
USER = nkeys.PREFIX_BYTE_USER
_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
# JetStream on, nothing else limited (nats-io/jwt's NoLimit is -1).
_UNLIMITED_ACCOUNT = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}
_JETSTREAM_LIMITS = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def new_seed(prefix: int) -> str:
    """A fresh nkey seed ("SO…", "SA…", "SU…") of the given role."""
    return bytes(nkeys.encode_seed(os.urandom(32), prefix)).decode()


def public_key(seed: str) -> str:
    """The public nkey ("O…", "A…", "U…") of a seed; raises ValueError for a malformed one."""
    try:
        return bytes(nkeys.from_seed(bytearray(seed.strip().encode())).public_key).decode()
    except (nkeys.NkeysError, ValueError) as exc:
        raise ValueError(f"not an nkey seed ({type(exc).__name__})") from None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode(claims: dict[str, Any], issuer_seed: str) -> str:
    """Signs `claims` (iss, jti and iat filled in) with `issuer_seed`."""
    pair = nkeys.from_seed(bytearray(issuer_seed.strip().encode()))
    claims = dict(claims)
    claims["iss"] = bytes(pair.public_key).decode()
    claims.setdefault("iat", int(time.time()))
    claims["jti"] = ""
    digest = hashlib.sha256(json.dumps(claims, separators=(",", ":")).encode()).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    head = _b64(json.dumps(_HEADER, separators=(",", ":")).encode())
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = pair.sign(f"{head}.{body}".encode())
    return f"{head}.{body}.{_b64(bytes(signature))}"


def decode_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified (for tests and tools)."""
    body = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return claims


def operator_jwt(operator_seed: str, system_account: str, name: str = "gpuplane") -> str:
    """The self-signed operator JWT naming the system account."""
    subject = public_key(operator_seed)
    claims = {
        "sub": subject,
        "name": name,
        "nats": {"system_account": system_account, "type": "operator", "version": 2},
    }
    return encode(claims, operator_seed)


def account_jwt(
    operator_seed: str,
    account: str,
    name: str,
    *,
    jetstream: bool,
    revocations: Mapping[str, int] | None = None,
    issued_at: int | None = None,
) -> str:
    """An account JWT signed by the operator; `revocations` maps user keys to the time (unix
    seconds) before and at which their JWTs no longer authenticate."""
    limits: dict[str, Any] = dict(_UNLIMITED_ACCOUNT)
    if jetstream:
        limits.update(_JETSTREAM_LIMITS)
    nats: dict[str, Any] = {"limits": limits, "type": "account", "version": 2}
    if revocations:
        nats["revocations"] = dict(sorted(revocations.items()))
    claims: dict[str, Any] = {"sub": account, "name": name, "nats": nats}
    if issued_at is not None:
        claims["iat"] = issued_at
    return encode(claims, operator_seed)


@dataclass(frozen=True)
class Permissions:
    """Subjects a user may publish and subscribe to; None = no restriction."""

    publish: Sequence[str] | None = None
    subscribe: Sequence[str] | None = None
    deny_subscribe: Sequence[str] = field(default_factory=tuple)


def user_jwt(account_seed: str, user: str, name: str, permissions: Permissions) -> str:
    """A user JWT issued by the account."""
    nats: dict[str, Any] = {"subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}
    if permissions.publish is not None:
        nats["pub"] = {"allow": list(permissions.publish)}
    if permissions.subscribe is not None or permissions.deny_subscribe:
        sub: dict[str, list[str]] = {}
        if permissions.subscribe is not None:
            sub["allow"] = list(permissions.subscribe)
        if permissions.deny_subscribe:
            sub["deny"] = list(permissions.deny_subscribe)
        nats["sub"] = sub
    return encode({"sub": user, "name": name, "nats": nats}, account_seed)


def creds(jwt: str, seed: str) -> str:
    """The .creds text nats-py (`user_credentials`) and the nats CLI read."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def host_inbox_prefix(host_id: str) -> str:
    """The reply-subject prefix a host's connection uses (nats-py `inbox_prefix`)."""
    return f"_INBOX_{host_id}"


def host_permissions(host_id: str) -> Permissions:
    """A host may pull and ack only its own dispatches, create or look up only its own
    durable (filtered to its subject: the server checks the filter in the subject against
    the request's), publish only its own reports and logs, and hear only its own inbox."""
    durable = dispatch_durable(host_id)
    api = f"$JS.API.CONSUMER.%s.{DISPATCH_STREAM}.{durable}"
    return Permissions(
        publish=[
            api % "MSG.NEXT",
            api % "INFO",
            f"{api % 'CREATE'}.{dispatch_subject(host_id)}",
            f"$JS.ACK.{DISPATCH_STREAM}.{durable}.>",
            f"{events_prefix(host_id)}.>",
            f"{logs_prefix(host_id)}.>",
        ],
        subscribe=[f"{host_inbox_prefix(host_id)}.>"],
    )


@dataclass(frozen=True)
class NatsKeys:
    """The three seeds the control plane holds (operator, application and system account)."""

    operator_seed: str
    account_seed: str
    system_account_seed: str

    @classmethod
    def generate(cls) -> NatsKeys:
        return cls(new_seed(OPERATOR), new_seed(ACCOUNT), new_seed(ACCOUNT))

    @property
    def account(self) -> str:
        return public_key(self.account_seed)

    @property
    def system_account(self) -> str:
        return public_key(self.system_account_seed)

    def operator_jwt(self) -> str:
        return operator_jwt(self.operator_seed, self.system_account)

    def account_jwt(
        self, revocations: Mapping[str, int] | None = None, issued_at: int | None = None
    ) -> str:
        return account_jwt(
            self.operator_seed,
            self.account,
            "GPUPLANE",
            jetstream=True,
            revocations=revocations,
            issued_at=issued_at,
        )

    def system_account_jwt(self) -> str:
        return account_jwt(self.operator_seed, self.system_account, "SYS", jetstream=False)

    def user_creds(self, name: str, permissions: Permissions, *, system: bool = False) -> str:
        """A fresh user of the application (or system) account, as .creds text."""
        seed = new_seed(USER)
        issuer = self.system_account_seed if system else self.account_seed
        return creds(user_jwt(issuer, public_key(seed), name, permissions), seed)

    def server_include(self, resolver_dir: str) -> str:
        """A nats-server config include: operator mode with a full resolver in
        `resolver_dir`, preloaded with both accounts (updates arrive on $SYS)."""
        return (
            f"operator: {self.operator_jwt()}\n"
            f"system_account: {self.system_account}\n"
            "resolver: {\n"
            "  type: full\n"
            f"  dir: {json.dumps(resolver_dir)}\n"
            "  allow_delete: false\n"
            "}\n"
            "resolver_preload: {\n"
            f"  {self.account}: {self.account_jwt()}\n"
            f"  {self.system_account}: {self.system_account_jwt()}\n"
            "}\n"
        )
