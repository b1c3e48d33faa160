"""The platform fee set at run time (SetPricingPolicy); until then, the settings' applies."""

from __future__ import annotations

import time

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.errors import InvalidArgument
from controlplane.ledger.repository import LedgerRepository

MAX_FEE_BASIS_POINTS = 10_000


class PlatformFees:
    """The fee an operator set, which charges are split by; None until one is set (callers
    then use their settings'). Stored in the database, so every control plane on it charges
    the same fee, and cached here for `ttl` seconds: a fee set on another control plane
    applies here within that, one set here at once."""

    def __init__(self, db: Database, *, ttl: float = 2.0) -> None:
        self.db = db
        self.ttl = ttl
        self._cached: int | None = None
        self._read_at = float("-inf")

    async def current(self, session: AsyncSession) -> int | None:
        """The fee set, in basis points, read through the caller's session when the cache is
        older than `ttl`; None when none was set."""
        if time.monotonic() - self._read_at > self.ttl:
            self._cached = await LedgerRepository(session).platform_fee()
            self._read_at = time.monotonic()
        return self._cached

    async def read(self) -> int | None:
        async with self.db.read() as session:
            return await self.current(session)

    async def set(self, fee_basis_points: int) -> int:
        if not 0 <= fee_basis_points <= MAX_FEE_BASIS_POINTS:
            raise InvalidArgument(
                "policy.platform_fee_basis_points", f"must be between 0 and {MAX_FEE_BASIS_POINTS}"
            )

        async def work(session: AsyncSession) -> None:
            await LedgerRepository(session).set_platform_fee(fee_basis_points, utcnow())

        await self.db.run(work)
        self._cached, self._read_at = fee_basis_points, time.monotonic()
        return fee_basis_points
