"""Job reports' signatures: each must be its host's Ed25519 signature of the report's bytes."""

from __future__ import annotations

from controlplane.db.engine import Database
from controlplane.registry.repository import RegistryRepository
from messaging.signing import decode_signature, verify

# Why a report was refused (the reports-dropped metric's reason label).
UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad_signature"
NO_HOST_KEY = "no_host_key"
# Hosts whose keys are kept in memory (then the cache starts over).
MAX_CACHED_KEYS = 100_000


class ReportSignatures:
    """Checks reports against their host's registered public key, cached per host (a
    signature that does not verify reloads it once: re-registration replaces the key; an
    unsigned report never reads the database twice). `required`: a host without a key (an
    earlier release's) has its reports refused; off, they are applied unsigned."""

    def __init__(self, db: Database, *, required: bool = True) -> None:
        self.db = db
        self.required = required
        self._keys: dict[str, bytes | None] = {}

    async def refusal(self, host_id: str, data: bytes, header: str | None) -> str | None:
        """None when the report may be applied; otherwise why it is refused."""
        signature = decode_signature(header)
        key = self._keys[host_id] if host_id in self._keys else await self._load(host_id)
        if signature is not None and key is not None and verify(key, signature, data):
            return None
        if signature is not None:
            key = await self._load(host_id)  # registered again since it was cached?
            if key is not None and verify(key, signature, data):
                return None
        if key is None:
            return NO_HOST_KEY if self.required else None
        return UNSIGNED if signature is None else BAD_SIGNATURE

    async def _load(self, host_id: str) -> bytes | None:
        async with self.db.read() as session:
            host = await RegistryRepository(session).get_host(host_id)
        key = None if host is None else host.signing_public_key
        if len(self._keys) >= MAX_CACHED_KEYS:
            self._keys.clear()
        self._keys[host_id] = key
        return key
