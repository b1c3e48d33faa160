"""Hypothesis: random interleavings of deposits, holds (submits), usage ticks, provider faults,
settlements, cancels, expiry, refunds and payouts (paid, failed) from concurrent asyncio
clients against PostgreSQL. After each example: the balances sum to zero and match the
transfers, no no-overdraft account is negative, every hold was resolved at most once, held
balances are exactly the pending holds' rest, no provider could pay out what is still
refundable, a provider's earnings go below zero (a receivable) only by refunds after its
payouts, every payout's state agrees with its transfers, every account's statement sums
to its balance, and a consumer with a monthly spending limit (raised at random) never has
the month's spend and holds above it, its spent being exactly the month's charges and fees
less its refunds (the ledger has no running accrual: charges come out of holds, which the
limit bounds)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import cast

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db import migrate
from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from controlplane.ledger.holds import AttemptCost, Resolution
from controlplane.ledger.limits import month_start
from controlplane.ledger.service import LedgerService
from controlplane.ledger.states import HoldState
from controlplane.paging import PageRequest
from tests.controlplane.ledger.conftest import CREDIT, FEE_BP, Ledger

pytestmark = pytest.mark.postgres

CONSUMERS = 3
PROVIDERS = 2
SLOTS = 6  # holds an example may place; two clients naming one slot replay its submit
CLIENTS = 6
EXPECTED = (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound)

amounts = st.integers(min_value=0, max_value=4 * CREDIT)
op = st.one_of(
    st.tuples(st.just("deposit"), st.integers(0, CONSUMERS - 1), amounts, st.integers(0, 2)),
    st.tuples(st.just("submit"), st.integers(0, SLOTS - 1)),
    st.tuples(
        st.just("usage"), st.integers(0, SLOTS - 1), st.integers(0, PROVIDERS - 1),
        st.integers(1, 2), amounts,
    ),
    st.tuples(st.just("lose"), st.integers(0, SLOTS - 1), st.integers(1, 2)),
    st.tuples(
        st.just("settle"), st.integers(0, SLOTS - 1), st.integers(0, PROVIDERS - 1),
        st.integers(1, 2), amounts,
    ),
    st.tuples(st.just("cancel"), st.integers(0, SLOTS - 1)),
    st.tuples(st.just("expire")),
    st.tuples(st.just("refund"), st.integers(0, SLOTS - 1), amounts, st.integers(0, 2)),
    st.tuples(
        st.just("payout"), st.integers(0, PROVIDERS - 1), st.integers(1, CREDIT),
        st.integers(0, 2),
    ),
    st.tuples(st.just("fail_payout"), st.integers(0, PROVIDERS - 1), st.integers(0, 2)),
    st.tuples(st.just("paid_payout"), st.integers(0, PROVIDERS - 1), st.integers(0, 2)),
    st.tuples(st.just("raise_limit"), st.integers(0, CONSUMERS - 1), amounts),
)  # fmt: skip
scenarios = st.tuples(
    st.lists(st.integers(100_000, 3 * CREDIT), min_size=SLOTS, max_size=SLOTS),
    st.lists(st.booleans(), min_size=SLOTS, max_size=SLOTS),
    st.lists(st.lists(op, min_size=2, max_size=9), min_size=CLIENTS, max_size=CLIENTS),
)
# Each consumer's monthly spending limit (None: none), set before anything else.
limit_choices = st.lists(
    st.one_of(st.none(), st.integers(1, 8 * CREDIT)), min_size=CONSUMERS, max_size=CONSUMERS
)


@dataclass
class World:
    ledger: Ledger
    hold_amounts: list[int]
    expired: list[bool]
    prefix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    holds: dict[int, str] = field(default_factory=dict)
    resolutions: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    # The consumers' spending limits; only raised, so each hold's check still bounds them.
    limits: dict[int, int] = field(default_factory=dict)
    # Raises of one example one at a time, so the stored limit is the last one computed.
    limit_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def consumer(self, n: int) -> str:
        return f"{self.prefix}-consumer{n}"

    def provider(self, n: int) -> str:
        return f"{self.prefix}-provider{n}"

    def job(self, slot: int) -> str:
        return f"{self.prefix}-job{slot}"

    @property
    def tenants(self) -> Iterator[str]:
        yield from (self.consumer(n) for n in range(CONSUMERS))
        yield from (self.provider(n) for n in range(PROVIDERS))


def resolved(world: World, hold_id: str, result: Resolution) -> None:
    if not result.replay:
        world.resolutions[hold_id] += 1


async def step(world: World, action: tuple[object, ...]) -> str:
    """Runs one action; "ok", or "skip" when it named a hold not placed (yet)."""
    service = world.ledger.service
    kind, args = str(action[0]), cast(list[int], list(action[1:]))
    if kind == "deposit":
        consumer, amount, key = args
        await service.deposit(world.consumer(consumer), amount or 1, "", f"{world.prefix}-{key}")
    elif kind == "submit":
        (slot,) = args
        lifetime = timedelta(seconds=-1 if world.expired[slot] else 3600)
        hold = await service.hold_credit(
            world.consumer(slot % CONSUMERS),
            world.hold_amounts[slot],
            f"{world.prefix}-slot{slot}",
            utcnow() + lifetime,
            job_id=world.job(slot),
        )
        world.holds[slot] = hold.id
    elif kind == "expire":
        for hold_id in await world.ledger.jobs().expire_holds():
            world.resolutions[hold_id] += 1
    elif kind in ("payout", "fail_payout", "paid_payout"):
        return await money_out(world, kind, args)
    elif kind == "raise_limit":
        consumer, amount = args
        if consumer not in world.limits:
            return "skip"
        async with world.limit_lock:
            world.limits[consumer] += amount
            await service.set_spending_limit(world.consumer(consumer), world.limits[consumer], [])
    else:
        return await on_hold(world, kind, args)
    return "ok"


async def on_hold(world: World, kind: str, args: list[int]) -> str:
    service = world.ledger.service
    slot = args[0]
    hold_id = world.holds.get(slot)
    if hold_id is None:
        return "skip"
    if kind in ("usage", "settle"):
        _, provider, attempt, amount = args
        cost = AttemptCost(world.provider(provider), attempt, amount, FEE_BP)
        if kind == "usage":
            await service.charge_hold(hold_id, cost)
        else:
            resolved(world, hold_id, await service.settle_hold(hold_id, cost, group_commit=True))
    elif kind == "lose":
        await service.refund_hold_attempt(hold_id, args[1])
    elif kind == "cancel":
        resolved(world, hold_id, await service.settle_hold(hold_id, None, group_commit=True))
    elif kind == "refund":
        _, amount, key = args
        await service.refund_job(world.job(slot), amount, "test", f"{world.prefix}-r{key}")
    return "ok"


async def money_out(world: World, kind: str, args: list[int]) -> str:
    service = world.ledger.service
    if kind == "payout":
        provider, amount, key = args
        await service.payout(world.provider(provider), amount, "iban", f"{world.prefix}-{key}")
        return "ok"
    provider, key = args
    async with world.ledger.db.read() as session:
        payout_id = await session.scalar(
            text("SELECT id FROM payouts WHERE tenant_id = :t AND idempotency_key = :k"),
            {"t": world.provider(provider), "k": f"{world.prefix}-{key}"},
        )
    if payout_id is None:
        return "skip"
    if kind == "paid_payout":
        await service.mark_payout_paid(payout_id)
    else:
        await service.fail_payout(payout_id, "bank said no")
    return "ok"


async def client(world: World, actions: list[tuple[object, ...]]) -> None:
    for action in actions:
        try:
            outcome = await step(world, action)
        except EXPECTED as error:
            outcome = type(error).__name__
        world.outcomes[f"{action[0]}: {outcome}"] += 1


async def pay_out_then_refund(world: World) -> None:
    """Every provider pays out all it may, then every settled job is refunded in full: the
    providers' parts of the refunds become receivables."""
    service = world.ledger.service
    for n in range(PROVIDERS):
        provider = world.provider(n)
        earned = (await service.balance(provider)).earnings
        with contextlib.suppress(*EXPECTED):
            await service.payout(provider, earned, "iban", f"{world.prefix}-everything")
    for slot in range(SLOTS):
        with contextlib.suppress(*EXPECTED):
            await service.refund_job(world.job(slot), 0, "final", f"{world.prefix}-final{slot}")


async def check_invariants(world: World) -> None:
    report = await world.ledger.service.check()
    assert report.mismatches == []
    assert report.balance_sum == 0
    async with world.ledger.db.read() as session:
        negative = (
            await session.execute(
                text("SELECT id FROM accounts WHERE no_overdraft AND balance < 0")
            )
        ).all()
        assert negative == []
        holds = {
            row.id: row
            for row in await session.execute(
                text("SELECT * FROM holds WHERE key LIKE :p"), {"p": f"hold/{world.prefix}-%"}
            )
        }
        releases = Counter(
            row.job_id
            for row in await session.execute(
                text("SELECT job_id FROM transfers WHERE kind = 'release' AND job_id LIKE :p"),
                {"p": f"{world.prefix}-%"},
            )
        )
        flows = await session.execute(
            text(
                "SELECT job_id, kind, credit_account_id, sum(amount) AS total FROM transfers "
                "WHERE job_id LIKE :p GROUP BY job_id, kind, credit_account_id"
            ),
            {"p": f"{world.prefix}-%"},
        )
        posted: Counter[str] = Counter()
        for row in flows:
            if row.kind in ("charge", "fee"):
                posted[row.job_id] += row.total
            elif row.kind == "refund" and row.credit_account_id.endswith(":held"):
                posted[row.job_id] -= row.total  # a provider fault, back into the hold
        # Admin refunds (to a consumer's available account) out of a provider's earnings.
        clawed: Counter[str] = Counter()
        for row in await session.execute(
            text(
                "SELECT debit_account_id, sum(amount) AS total FROM transfers WHERE kind = "
                "'refund' AND credit_account_id LIKE :to AND debit_account_id LIKE :p "
                "GROUP BY debit_account_id"
            ),
            {"to": "%:available", "p": f"{world.prefix}-%:earnings"},
        ):
            clawed[row.debit_account_id] += row.total
        await check_payouts(session, world)
        balances = {
            row.id: row.balance
            for row in await session.execute(
                text("SELECT id, balance FROM accounts WHERE tenant_id LIKE :p"),
                {"p": f"{world.prefix}-%"},
            )
        }
    pending_rest: Counter[str] = Counter()
    unsettled: Counter[str] = Counter()
    for hold in holds.values():
        assert posted[hold.job_id] == hold.posted_amount, hold.id
        if hold.state == HoldState.PENDING.value:
            assert world.resolutions[hold.id] == 0
            assert releases[hold.job_id] == 0
            pending_rest[hold.tenant_id] += hold.amount - hold.posted_amount
            if hold.provider_tenant_id:
                unsettled[hold.provider_tenant_id] += hold.attempt_charged - hold.attempt_fee
        else:
            assert world.resolutions[hold.id] == 1, (hold.id, hold.state)
            assert releases[hold.job_id] == (1 if hold.amount > hold.posted_amount else 0)
    for n in range(CONSUMERS):
        consumer = world.consumer(n)
        assert balances.get(f"{consumer}:held", 0) == pending_rest[consumer]
    for n in range(PROVIDERS):
        provider = world.provider(n)
        # Payouts never take what is refundable; only an admin refund after a payout takes
        # earnings below that (down to a receivable, which the next charges pay off).
        earnings = f"{provider}:earnings"
        assert balances.get(earnings, 0) + clawed[earnings] >= unsettled[provider]
        if balances.get(earnings, 0) < 0:
            event("a provider ends with a receivable")
    await check_statements(world, balances)
    await check_limits(world)


async def check_limits(world: World) -> None:
    """Each consumer's month: spent is the month's charges and fees out of its held account
    less the refunds into its accounts (recomputed here), committed its held balance, and
    a limited consumer's spent and committed together within its limit."""
    now = utcnow()
    start = month_start(now)
    async with world.ledger.db.read() as session:
        for n in range(CONSUMERS):
            consumer = world.consumer(n)
            budget = await world.ledger.service.budget_in(session, consumer, now)
            flows = await session.execute(
                text(
                    "SELECT kind, debit_account_id, credit_account_id, amount FROM transfers "
                    "WHERE (debit_account_id LIKE :c OR credit_account_id LIKE :c) "
                    "AND created_at >= :start"
                ),
                {"c": f"{consumer}:%", "start": start},
            )
            spent = 0
            for row in flows:
                if row.kind in ("charge", "fee") and row.debit_account_id == f"{consumer}:held":
                    spent += row.amount
                elif row.kind == "refund" and row.credit_account_id.startswith(f"{consumer}:"):
                    spent -= row.amount
            assert budget.spent == spent, consumer
            held = await session.scalar(
                text("SELECT balance FROM accounts WHERE id = :a"), {"a": f"{consumer}:held"}
            )
            assert budget.committed == (held or 0)
            if n in world.limits:
                assert budget.monthly_limit == world.limits[n]
                assert budget.spent + budget.committed <= world.limits[n], (consumer, budget)
                if budget.spent + budget.committed > world.limits[n] // 2:
                    event("a limited consumer spent or holds over half its limit")


async def check_payouts(session: AsyncSession, world: World) -> None:
    """Each payout has its PAYOUT transfer, and a PAYOUT_REVERSAL exactly when REVERSED."""
    rows = await session.execute(
        text(
            "SELECT p.state, p.amount, t.amount AS moved, r.amount AS back FROM payouts p "
            "JOIN transfers t ON t.id = p.transfer_id "
            "LEFT JOIN transfers r ON r.id = p.reversal_transfer_id WHERE p.tenant_id LIKE :p"
        ),
        {"p": f"{world.prefix}-%"},
    )
    for row in rows:
        assert row.moved == row.amount
        assert row.back == (row.amount if row.state == "reversed" else None), row


async def check_statements(world: World, balances: dict[str, int]) -> None:
    """Every tenant's statement: one line per leg, each account's lines sum to its balance."""
    for tenant in world.tenants:
        sums: Counter[str] = Counter()
        token = ""
        while True:
            page = await world.ledger.service.entries(
                tenant, [], [], None, None, None, PageRequest(token, 500)
            )
            for entry in page.items:
                sums[entry.account_id] += entry.amount
                assert entry.account_id.startswith(f"{tenant}:")
            token = page.next_cursor
            if not token:
                break
        mine = {a: b for a, b in balances.items() if a.startswith(f"{tenant}:")}
        assert {a: sums[a] for a in mine} == mine
        assert set(sums) <= set(mine)


async def run_example(
    url: str,
    scenario: tuple[list[int], list[bool], list[list[object]]],
    limits: list[int | None],
) -> None:
    hold_amounts, expired, plans = scenario
    db = Database(url, pool_size=8)
    try:
        world = World(Ledger(db, LedgerService(db, min_payout=1)), hold_amounts, expired)
        for n in range(CONSUMERS):
            await world.ledger.service.deposit(world.consumer(n), 6 * CREDIT, "", world.consumer(n))
            limit = limits[n]
            if limit is not None:
                world.limits[n] = limit
                await world.ledger.service.set_spending_limit(world.consumer(n), limit, [])
        # Each client submits first (six clients, six slots: every hold is placed, some twice).
        actions: list[list[tuple[object, ...]]] = [
            [("submit", n % SLOTS), *(tuple(a) for a in plan)]  # type: ignore[arg-type]
            for n, plan in enumerate(plans)
        ]
        await asyncio.wait_for(
            asyncio.gather(*(client(world, plan) for plan in actions)), timeout=60
        )
        await check_invariants(world)
        await pay_out_then_refund(world)
        await check_invariants(world)
        for outcome in world.outcomes:
            event(outcome)
    finally:
        await db.close()


@pytest.fixture(scope="module")
def ledger_url(postgres: object) -> str:
    cluster = postgres
    name = cluster.create_database(f"ledger_props_{uuid.uuid4().hex[:8]}")  # type: ignore[attr-defined]
    url: str = cluster.url(name)  # type: ignore[attr-defined]
    migrate.upgrade(url)
    return url


@pytest.mark.timeout(240)
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios, limits=limit_choices)
def test_random_interleavings_keep_the_ledger_exact(
    ledger_url: str,
    scenario: tuple[list[int], list[bool], list[list[object]]],
    limits: list[int | None],
) -> None:
    asyncio.run(run_example(ledger_url, scenario, limits))
