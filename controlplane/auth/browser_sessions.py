"""Browser sessions of the dashboard: an API key exchanged for a cookie token, resolved back
to the key (and so to its principal) on every call."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from controlplane.auth.browser_sessions_repository import BrowserSessionRepository
from controlplane.auth.models import ApiKey, BrowserSession
from controlplane.auth.principal import Principal, Role
from controlplane.auth.repository import AuthRepository
from controlplane.auth.service import hash_secret
from controlplane.db.base import new_id, utcnow
from controlplane.db.engine import Database
from controlplane.errors import Unauthenticated

SESSION_TOKEN_PREFIX = "gps_"
# The one answer to a failed login, whatever failed: nothing about the key is leaked.
INVALID_KEY = "invalid API key"
ENDED = "the session has ended or expired: log in again"


@dataclass(frozen=True, slots=True)
class Login:
    """A new session: its token (shown once, to the browser's cookie) and who it acts as."""

    token: str
    principal: Principal


def _key_usable(key: ApiKey | None, now: datetime) -> bool:
    return (
        key is not None
        and key.revoked_at is None
        and (key.expires_at is None or key.expires_at > now)
        and key.role != Role.HOST.value
    )


class BrowserSessions:
    """Owns browser sessions. Each session ends `idle` seconds after its last use or `max_life`
    seconds after login, whichever comes first, and at once when its API key is revoked or
    expires: nothing is cached, every call reads the session and its key (one indexed join)."""

    def __init__(self, db: Database, idle: float, max_life: float) -> None:
        self.db = db
        self.idle = timedelta(seconds=idle)
        self.max_life = timedelta(seconds=max_life)
        # last_used_at is written at most this often, so a busy session rarely writes.
        self.touch_every = min(timedelta(minutes=1), self.idle / 4)

    async def login(self, api_key: str) -> Login:
        """A session for a valid, unrevoked, unexpired API key, or UNAUTHENTICATED (one message
        for every failure). Host credentials are not API keys: they cannot log in."""
        now = utcnow()
        async with self.db.transaction() as session:
            key = await AuthRepository(session).key_by_hash(hash_secret(api_key))
            if key is None or not _key_usable(key, now):
                raise Unauthenticated(INVALID_KEY)
            # Sessions that ended by time go as new ones come: the table stays small.
            await BrowserSessionRepository(session).delete_ended(now - self.idle, now)
            token = SESSION_TOKEN_PREFIX + secrets.token_urlsafe(32)
            expires = now + self.max_life
            if key.expires_at is not None:
                expires = min(expires, key.expires_at)
            BrowserSessionRepository(session).add(
                BrowserSession(
                    id=new_id("web"),
                    token_hash=hash_secret(token),
                    api_key_id=key.id,
                    created_at=now,
                    last_used_at=now,
                    expires_at=expires,
                )
            )
            principal = Principal(key.tenant_id, Role(key.role), key.id)
        return Login(token, principal)

    async def authenticate(self, token: str) -> Principal:
        """The principal of a live session's token (its API key's), or UNAUTHENTICATED."""
        digest = hash_secret(token)
        now = utcnow()
        async with self.db.read() as session:
            found = await BrowserSessionRepository(session).with_key(digest)
        if found is None:
            raise Unauthenticated(ENDED)
        row, key = found
        if (
            row.expires_at <= now
            or row.last_used_at + self.idle <= now
            or not _key_usable(key, now)
        ):
            raise Unauthenticated(ENDED)
        if now - row.last_used_at >= self.touch_every:
            async with self.db.transaction() as session:
                await BrowserSessionRepository(session).touch(row.id, now)
        return Principal(key.tenant_id, Role(key.role), key.id)

    async def logout(self, token: str) -> None:
        """Ends the session of `token` (if any) for good."""
        async with self.db.transaction() as session:
            await BrowserSessionRepository(session).delete(hash_secret(token))
