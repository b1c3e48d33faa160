"""A batch of settlements with bad items in it: settle_many answers each request on its own
(a missing hold None, a replay or a hold twice in the batch moves nothing), and through group
commit a request that fails the batch fails alone; the rest settle exactly once."""

from __future__ import annotations

import asyncio

from controlplane.errors import FailedPrecondition, NotFound
from controlplane.ledger.holds import Settle
from controlplane.ledger.service import split_fee
from controlplane.ledger.states import HoldState
from tests.controlplane.ledger.conftest import CREDIT, FEE_BP, Ledger, cost


async def test_settle_many_answers_each_request_of_a_batch_with_bad_items(
    ledger: Ledger,
) -> None:
    consumer = await ledger.funded("consumer")
    provider = ledger.tenant("provider")
    good = [await ledger.hold(consumer, CREDIT) for _ in range(3)]
    resolved = await ledger.hold(consumer, CREDIT)
    await ledger.service.settle_hold(resolved.id, cost(provider, 100), group_commit=True)
    requests = [
        Settle(good[0].id, cost(provider, 1000), "k0", "r0"),
        Settle("hold_missing", cost(provider, 1000), "km", "rm"),
        Settle(resolved.id, cost(provider, 5000), "kr", "rr"),  # resolved before: a replay
        Settle(good[1].id, cost(provider, 2000), "k1", "r1"),
        Settle(good[1].id, cost(provider, 9000), "k1b", "r1b"),  # the same hold again
        Settle(good[2].id, None, "k2", "r2"),  # nothing ran: voided
    ]
    async with ledger.db.transaction() as session:
        answers = await ledger.service.settle_many(session, requests)
    assert answers[1] is None  # no such hold
    first, replay, second, twice, voided = (a for n, a in enumerate(answers) if n != 1)
    assert first is not None
    assert (first.posted, first.released, first.replay) == (1000, CREDIT - 1000, False)
    assert replay is not None
    assert (replay.posted, replay.replay) == (100, True)
    assert second is not None
    assert (second.posted, second.replay) == (2000, False)
    assert twice is not None
    assert (twice.posted, twice.replay) == (2000, True)
    assert voided is not None
    assert (voided.state, voided.posted) == (HoldState.VOIDED, 0)
    balance = await ledger.service.balance(consumer)
    assert (balance.held, balance.available) == (0, 100 * CREDIT - 100 - 1000 - 2000)
    earned = sum(split_fee(c, FEE_BP)[0] for c in (100, 1000, 2000))
    assert (await ledger.service.balance(provider)).earnings == earned
    report = await ledger.service.check()
    assert report.consistent, report.mismatches


async def test_a_settlement_that_fails_its_batch_fails_alone(ledger: Ledger) -> None:
    consumer = await ledger.funded("consumer")
    provider, other = ledger.tenant("provider"), ledger.tenant("other")
    holds = [await ledger.hold(consumer, CREDIT) for _ in range(6)]
    # The first hold's attempt 1 is charged to `provider`: settling it for `other` is refused.
    await ledger.service.charge_hold(holds[0].id, cost(provider, 10))
    settlements = [
        ledger.service.settle_hold(holds[0].id, cost(other, 500), group_commit=True),
        ledger.service.settle_hold("hold_missing", cost(provider, 500), group_commit=True),
        *(
            ledger.service.settle_hold(h.id, cost(provider, 500 + n), group_commit=True)
            for n, h in enumerate(holds[1:])
        ),
    ]
    batches = ledger.service.settlements.batches
    outcomes = await asyncio.gather(*settlements, return_exceptions=True)
    assert isinstance(outcomes[0], FailedPrecondition)
    assert isinstance(outcomes[1], NotFound)
    for n, outcome in enumerate(outcomes[2:]):
        assert not isinstance(outcome, BaseException)
        assert (outcome.posted, outcome.replay) == (500 + n, False)
    assert ledger.service.settlements.batches - batches < len(settlements)
    refused = await ledger.service.get_hold(holds[0].id)
    assert (refused.state, refused.posted_amount) == ("pending", 10)
    balance = await ledger.service.balance(consumer)
    assert balance.held == CREDIT - 10
    assert balance.available == 100 * CREDIT - CREDIT - sum(500 + n for n in range(5))
    report = await ledger.service.check()
    assert report.consistent, report.mismatches
