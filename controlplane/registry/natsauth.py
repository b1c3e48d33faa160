"""Scoped NATS users for hosts, and the account JWT (with its revocations) pushed to NATS."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from dataclasses import dataclass

import nats
import nats.errors
from nats.aio.client import RawCredentials

from controlplane.db.engine import Database
from controlplane.errors import Unavailable
from controlplane.registry.repository import RegistryRepository
from messaging.natsjwt import USER, NatsKeys, Permissions, host_permissions, new_seed, public_key
from messaging.natsjwt import creds as creds_text
from messaging.natsjwt import user_jwt as mint_user_jwt

log = logging.getLogger(__name__)

# The system account subject a full resolver takes account JWT updates on.
CLAIMS_UPDATE = "$SYS.REQ.CLAIMS.UPDATE"


@dataclass(frozen=True)
class HostUser:
    """A host's NATS user: its public key (stored on the host row) and .creds text (handed
    to the daemon once, never stored here)."""

    public_key: str
    creds: str


class NatsAuth:
    """Holds the operator and account seeds. Mints the control plane's own user (no limits),
    one scoped user per host registration, and account JWTs whose `revocations` are the
    database's nats_revocations, pushed through a system-account user to the servers'
    full resolver (which disconnects revoked users at once)."""

    def __init__(
        self,
        keys: NatsKeys,
        servers: list[str],
        db: Database,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.keys = keys
        self.servers = servers
        self.db = db
        self.tls = tls  # the control plane's own NATS TLS context, for the push connection
        self.pushes = 0
        self._lock = asyncio.Lock()

    def host_user(self, host_id: str) -> HostUser:
        seed = new_seed(USER)
        user = public_key(seed)
        token = mint_user_jwt(self.keys.account_seed, user, host_id, host_permissions(host_id))
        return HostUser(user, creds_text(token, seed))

    async def account_jwt(self) -> str:
        """The application account's JWT as the database says it is now."""
        async with self.db.read() as session:
            revoked = await RegistryRepository(session).nats_revocations()
        return self.keys.account_jwt({key: int(when.timestamp()) for key, when in revoked})

    async def push_account(self, timeout: float = 5.0) -> None:
        """Sends the current account JWT to NATS; raises Unavailable when it was not taken.
        Pushes are serialised here, and each reads the database afresh, so the last one
        pushed carries every revocation committed before it started."""
        async with self._lock:
            token = await self.account_jwt()
            system_user = self.keys.user_creds(
                "gpuplane-controlplane-sys", Permissions(), system=True
            )
            try:
                client = await nats.connect(
                    servers=self.servers,
                    name="gpuplane-controlplane-sys",
                    user_credentials=RawCredentials(system_user),
                    allow_reconnect=False,
                    connect_timeout=timeout,
                    tls=self.tls,
                )
            except (OSError, TimeoutError, nats.errors.Error) as error:
                raise Unavailable(f"NATS is not reachable to update the account: {error}") from None
            try:
                reply = await client.request(CLAIMS_UPDATE, token.encode(), timeout=timeout)
            except (TimeoutError, nats.errors.Error) as error:
                raise Unavailable(f"NATS did not take the account update: {error}") from None
            finally:
                await client.close()
            answer = json.loads(reply.data or b"{}")
            if "error" in answer:
                raise Unavailable(f"NATS refused the account update: {answer['error']}")
            self.pushes += 1
            log.info("pushed the NATS account JWT (%d bytes)", len(token))
