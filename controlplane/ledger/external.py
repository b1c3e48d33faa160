"""The external account, sharded: money entering and leaving the platform, in int64 shards."""

from __future__ import annotations

from controlplane.ledger.repository import LedgerRepository
from controlplane.ledger.transfers import (
    EXTERNAL,
    INT64_MIN,
    PLATFORM,
    AccountKind,
)

# The external account goes down by every deposit and up by every payout, so its total is
# minus all the money inside the platform: it can pass what one int64 balance holds while
# every other account stays far inside (each is bounded by what one tenant holds). So it is
# sharded: "platform:external" is shard 0 and "platform:external/<n>" shard n, each a row of
# its own within int64. Money entering goes to the first shard with room; money leaving to
# the lowest (the most negative), which stays at or below zero while the total does. The
# settlement path never touches it.


def shard_id(n: int) -> str:
    return EXTERNAL if n == 0 else f"{EXTERNAL}/{n}"


def shard_number(account: str) -> int:
    return int(account.partition("/")[2] or 0)


async def lock_shards(repo: LedgerRepository, *others: str) -> dict[str, int]:
    """Locks every external shard together with `others` (in account-id order, as post()
    does); all their balances."""
    shards = await repo.account_ids(PLATFORM, AccountKind.EXTERNAL.value)
    return await repo.lock_balances([*shards, *others])


async def shard_to_debit(repo: LedgerRepository, balances: dict[str, int], amount: int) -> str:
    """The shard money entering the platform comes from (locked in `balances`): the first
    that stays within int64, or a new one."""
    shards = sorted((a for a in balances if a.startswith(EXTERNAL)), key=shard_number)
    for account in shards:
        if balances[account] - amount >= INT64_MIN:
            return account
    new = shard_id(max((shard_number(a) for a in shards), default=-1) + 1)
    await repo.ensure_account(new, PLATFORM, AccountKind.EXTERNAL.value, False)
    return new


def shard_to_credit(balances: dict[str, int]) -> str:
    """The shard money leaving the platform goes to (locked in `balances`): the lowest."""
    shards = [a for a in balances if a.startswith(EXTERNAL)]
    return min(shards, key=lambda a: (balances[a], shard_number(a)), default=EXTERNAL)
