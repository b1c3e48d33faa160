"""The hold and payout state machines, their setters, and the one way into the ledger."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from controlplane.db.base import utcnow
from controlplane.ledger.states import (
    HOLDS,
    PAYOUTS,
    HoldState,
    PayoutState,
    resolve_holds,
    set_hold_state,
)
from controlplane.statemachine import MACHINES, InvalidTransition
from tests.controlplane.ledger.conftest import CREDIT, Ledger, cost

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Row:
    id: str
    state: str
    updated_at: datetime
    resolved_at: datetime | None = None


def test_the_machines_are_registered_with_their_tables() -> None:
    assert MACHINES["hold"] is HOLDS
    assert MACHINES["payout"] is PAYOUTS
    assert {(e.source, e.target) for e in HOLDS.edges()} == {
        (HoldState.PENDING, HoldState.POSTED),
        (HoldState.PENDING, HoldState.VOIDED),
        (HoldState.PENDING, HoldState.EXPIRED),
    }
    assert HOLDS.terminal == {HoldState.POSTED, HoldState.VOIDED, HoldState.EXPIRED}
    assert {(e.source, e.target) for e in PAYOUTS.edges()} == {
        (PayoutState.PENDING, PayoutState.PAID),
        (PayoutState.PENDING, PayoutState.REVERSED),
        (PayoutState.PAID, PayoutState.REVERSED),
    }
    assert PAYOUTS.terminal == {PayoutState.REVERSED}


def test_a_hold_is_resolved_once() -> None:
    before = utcnow() - timedelta(hours=1)
    now = utcnow()
    row = Row("hold_1", HoldState.PENDING.value, before)
    assert set_hold_state(row, HoldState.POSTED, now)
    assert (row.state, row.updated_at, row.resolved_at) == ("posted", now, now)
    assert not set_hold_state(row, HoldState.VOIDED, utcnow())
    assert (row.state, row.updated_at, row.resolved_at) == ("posted", now, now)


def test_the_batch_form_checks_every_edge_before_changing_any() -> None:
    before = utcnow() - timedelta(hours=1)
    pending = Row("hold_1", HoldState.PENDING.value, before)
    resolved = Row("hold_2", HoldState.VOIDED.value, before, before)
    with pytest.raises(InvalidTransition):
        resolve_holds([(pending, HoldState.POSTED), (resolved, HoldState.EXPIRED)], utcnow())
    assert (pending.state, pending.resolved_at) == ("pending", None)
    assert resolved.state == "voided"
    now = utcnow()
    resolve_holds([(pending, HoldState.EXPIRED)], now)
    assert (pending.state, pending.resolved_at) == ("expired", now)


async def test_a_settlement_in_its_own_transaction_is_the_jobs_path(ledger: Ledger) -> None:
    # Without group commit a settlement runs LedgerService.settle in a transaction of its
    # own, as a job's does in the job's: the same statements, no committing post.
    consumer = await ledger.funded("consumer")
    provider = ledger.tenant("provider")
    hold = await ledger.hold(consumer, 2 * CREDIT)
    done = await ledger.service.settle_hold(hold.id, cost(provider, CREDIT), group_commit=False)
    assert (done.state, done.posted, done.released, done.replay) == (
        HoldState.POSTED,
        CREDIT,
        CREDIT,
        False,
    )
    again = await ledger.service.settle_hold(hold.id, None, group_commit=False)
    assert (again.state, again.posted, again.replay) == (HoldState.POSTED, CREDIT, True)
    assert (await ledger.service.balance(consumer)).available == 99 * CREDIT
    assert (await ledger.service.check()).consistent


HOLD_MECHANICS = {"place_hold", "charge", "refund_attempt", "settle", "settle_many", "extend"}


def test_only_the_ledger_calls_the_hold_mechanics() -> None:
    """Holds are changed through LedgerService (ledger/service.py) alone: nothing outside
    controlplane/ledger imports ledger/holds.py's functions (its dataclasses are fine)."""
    offenders: list[str] = []
    for folder in ("controlplane", "bench", "devstack", "gpuplane_cli", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.parent == ROOT / "controlplane" / "ledger":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom):
                    continue
                names = {alias.name for alias in node.names}
                if (node.module == "controlplane.ledger.holds" and names & HOLD_MECHANICS) or (
                    node.module == "controlplane.ledger" and "holds" in names
                ):
                    offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
