"""SetPricingPolicy: an operator sets the platform fee at run time and the next charges are
split by it; what settings fix cannot change; on SQLite and PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
from gpuplane.v1 import admin_pb2, types_pb2

from controlplane.ledger.service import split_fee
from tests.controlplane.ledger.test_payouts_api import PRICE, run_hour
from tests.controlplane.scripted_host import scripted_host
from tests.harness import CREDIT, JobPlane

pytestmark = pytest.mark.databases("sqlite", "postgresql")


async def test_the_fee_set_at_run_time_splits_the_next_charges(plane: JobPlane) -> None:
    admin = plane.auth()
    before = (
        await plane.admin.GetPricingPolicy(admin_pb2.GetPricingPolicyRequest(), metadata=admin)
    ).policy
    wanted = types_pb2.PricingPolicy(platform_fee_basis_points=2500)
    reply = await plane.admin.SetPricingPolicy(
        admin_pb2.SetPricingPolicyRequest(policy=wanted), metadata=admin
    )
    assert reply.policy.platform_fee_basis_points == 2500
    assert reply.policy.min_payout_micro_credits == before.min_payout_micro_credits
    seen = await plane.admin.GetPricingPolicy(
        admin_pb2.GetPricingPolicyRequest(), metadata=plane.auth(plane.consumer_key)
    )
    assert seen.policy == reply.policy
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        await run_hour(plane, host)
    finally:
        await host.close()
    provider = await plane.balance(plane.provider_tenant)
    assert provider.earnings_micro_credits == split_fee(2 * CREDIT, 2500)[0] == 3 * CREDIT // 2
    for policy, field in [
        (types_pb2.PricingPolicy(platform_fee_basis_points=10_001), "platform_fee_basis_points"),
        (types_pb2.PricingPolicy(min_payout_micro_credits=1), "min_payout_micro_credits"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await plane.admin.SetPricingPolicy(
                admin_pb2.SetPricingPolicyRequest(policy=policy), metadata=admin
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (error.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await plane.admin.SetPricingPolicy(admin_pb2.SetPricingPolicyRequest(), metadata=admin)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await plane.assert_ledger_consistent()
