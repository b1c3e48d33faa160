"""The hold and payout state machines: states, tables, the only setters and their history.

History. The ledger keeps no event table: its transfers are the history. A hold's HOLD
transfer (`hold_transfer_id`) records its creation as PENDING; its resolution is recorded on
the row (`state`, `resolved_at`) and by its RELEASE transfer (`release_transfer_id`; none
when nothing was left to release), with the CHARGE/FEE transfers of what it was charged. A
payout's PAYOUT transfer (`transfer_id`) records its creation as PENDING and its
PAYOUT_REVERSAL transfer (`reversal_transfer_id`, with the reason) the move to REVERSED.
PENDING → PAID moves no money: only the row (`state`, `updated_at`) and the log record it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from controlplane.db.base import utcnow
from controlplane.statemachine import InvalidTransition, StateMachine, produces, register

if TYPE_CHECKING:  # models.py takes its states' defaults from here
    from controlplane.ledger.models import Hold, Payout

log = logging.getLogger(__name__)


class HoldState(StrEnum):
    PENDING = "pending"
    # Resolved with charges: the charges went to earnings and revenue, the rest back.
    POSTED = "posted"
    # Resolved with nothing charged (cancelled before it ran): everything released.
    VOIDED = "voided"
    # Resolved by the expiry sweep: past expires_at with no outcome; the rest released.
    EXPIRED = "expired"


class PayoutState(StrEnum):
    PENDING = "pending"
    PAID = "paid"
    # Failed: the money came back to earnings by a PAYOUT_REVERSAL transfer.
    REVERSED = "reversed"


# A hold leaves PENDING exactly once. The statement that writes it back (repository_pg.POST,
# its SQLite twin UPDATE_PENDING_HOLDS) matches only rows still in the state the hold was
# locked in, so replays and races resolve it at most once.
HOLDS = register(
    StateMachine(
        "hold",
        HoldState,
        HoldState.PENDING,
        {
            HoldState.PENDING: {
                HoldState.POSTED: "settled with something charged: the rest released",
                HoldState.VOIDED: "settled with nothing charged (cancelled before it ran)",
                HoldState.EXPIRED: "the expiry sweep: past expires_at with no outcome",
            },
            HoldState.POSTED: {},
            HoldState.VOIDED: {},
            HoldState.EXPIRED: {},
        },
    )
)

PAYOUTS = register(
    StateMachine(
        "payout",
        PayoutState,
        PayoutState.PENDING,
        {
            PayoutState.PENDING: {
                PayoutState.PAID: "the payment processor confirmed it",
                PayoutState.REVERSED: "the payment failed: the money back to earnings",
            },
            PayoutState.PAID: {PayoutState.REVERSED: "a payment that bounced later"},
            PayoutState.REVERSED: {},
        },
    )
)


_HOLD_RESOLVED = HOLDS.terminal


class HoldRow(Protocol):
    """A hold locked by the caller, changed in memory and written back by one statement."""

    id: str
    state: str
    updated_at: datetime
    resolved_at: datetime | None


# Holds ---------------------------------------------------------------------------------------


def new_hold(**columns: Any) -> Hold:
    """A hold in its first state (PENDING): the only place a hold comes to be."""
    from controlplane.ledger.models import Hold

    return Hold(state=HOLDS.initial.value, **columns)


def set_hold_state(hold: HoldRow, target: HoldState, now: datetime) -> bool:
    """The only setter of a hold's state (in memory; written back by the caller's post).
    False, and nothing changed, when the edge does not apply (the hold is resolved)."""
    if not HOLDS.check(HoldState(hold.state), target):
        return False
    hold.state = target.value
    hold.updated_at = now
    if target in _HOLD_RESOLVED:
        hold.resolved_at = now
    return True


# The states a settlement computes for a pending hold (the targets resolve_holds is given):
# the outcome its caller asked for (EXPIRED from the expiry sweep), else POSTED when something
# was charged and VOIDED when nothing was.
HOLD_RESOLUTIONS = produces(frozenset({HoldState.POSTED, HoldState.VOIDED, HoldState.EXPIRED}))


def resolution_of(posted_amount: int, outcome: HoldState | None) -> HoldState:
    """Where a pending hold goes when it is settled."""
    target = outcome or (HoldState.POSTED if posted_amount else HoldState.VOIDED)
    if target not in HOLD_RESOLUTIONS:
        raise InvalidTransition(f"hold: {target} is not a resolution")
    return target


def resolve_holds(changes: Sequence[tuple[HoldRow, HoldState]], now: datetime) -> None:
    """The batch form, for a post that resolves many holds in one statement: every edge is
    checked before any hold changes (InvalidTransition: the caller resolved a hold it had
    not found pending, a bug)."""
    for hold, target in changes:
        HOLDS.require(HoldState(hold.state), target)
    for hold, target in changes:
        set_hold_state(hold, target, now)


# Payouts -------------------------------------------------------------------------------------


class PayoutMover(Protocol):
    async def move_payout(
        self, payout_id: str, sources: Sequence[PayoutState], **values: Any
    ) -> bool: ...


def new_payout(**columns: Any) -> Payout:
    """A payout in its first state (PENDING): the only place a payout comes to be."""
    from controlplane.ledger.models import Payout

    return Payout(state=PAYOUTS.initial.value, **columns)


async def set_payout_state(
    repo: PayoutMover, payout: Payout, target: PayoutState, **values: Any
) -> bool:
    """The only setter of a payout's state: checks the edge from the state `payout` was read
    in (locked), then moves the row with a guarded UPDATE (only while still in that state),
    with `values` (the reversal's transfer id and reason). False when nothing moved."""
    current = PayoutState(payout.state)
    if not PAYOUTS.check(current, target):
        return False
    now = utcnow()
    if not await repo.move_payout(
        payout.id, [current], state=target.value, updated_at=now, **values
    ):
        return False
    log.info("payout %s: %s → %s", payout.id, current, target)
    return True
