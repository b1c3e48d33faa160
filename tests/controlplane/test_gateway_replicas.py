"""Two control planes on one PostgreSQL database: the daemon and every change are on the
first, which serves no gateway; the second's gateway hears of them through the change stream
(core NATS) at once (within BOUND), with its full resync and its API-key cache's ttl an hour
away: a deployed service, a replica probed ready then unready, a caller key created then revoked,
an API key revoked, a deleted service."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from gpuplane.v1 import admin_pb2, messaging_pb2, services_pb2, types_pb2

from controlplane.gateway.routes import Route
from devstack.factories import new_key
from tests.controlplane.scheduler.planes import InProcessPlane, fleet, plane_options
from tests.controlplane.scripted_host import scripted_host as start_host
from tests.controlplane.test_gateway_routes import (
    BOUND,
    PRICE,
    ProbingHost,
    deploy,
    fetch,
    gateway_base,
    services_stub,
    within,
)

K = messaging_pb2.JobReportKind
SV = services_pb2
pytestmark = [pytest.mark.postgres, pytest.mark.timeout(90)]


def route(plane: InProcessPlane, name: str) -> Route | None:
    services = plane.plane.services
    assert services is not None
    assert services.gateway is not None
    return services.gateway.routes.named(plane.api.consumer_tenant, name)


def routed(plane: InProcessPlane, name: str) -> tuple[str, ...] | None:
    found = route(plane, name)
    return None if found is None else found.replica_ids


async def test_a_gateway_follows_changes_made_on_another_replica(
    tmp_path: Path, pg_url: str, nats_server: Any, s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = plane_options(pg_url, nats_server, s3_server, service_reconcile_interval_ms=100)
    async with fleet(tmp_path, options, monkeypatch) as planes:
        first = await planes.start("first")
        second = await planes.start(
            "second",
            gateway_address="127.0.0.1:0",
            gateway_resync_ms=3_600_000,
            auth_cache_ttl_seconds=3600,
        )
        base = await gateway_base(second.api)
        api, key = first.api, first.api.consumer_key
        host = await start_host(api, ProbingHost, gpus=2, price=PRICE)
        try:
            await deploy(api, "web", key)
            await within(lambda: route(second, "web") is not None)

            dispatch = await host.next_dispatch()
            await host.report(dispatch, K.JOB_REPORT_KIND_STARTING)
            await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
            await host.probed(dispatch.job_id, ready=True)
            await within(lambda: routed(second, "web") == (dispatch.job_id,), 3)
            await host.probed(dispatch.job_id, ready=False, reason="HTTP 500")
            await within(lambda: routed(second, "web") == ())

            stub, auth = services_stub(api), api.auth(key)
            made = await stub.CreateServiceKey(
                SV.CreateServiceKeyRequest(service="web"), metadata=auth
            )
            await within(lambda: bool(getattr(route(second, "web"), "keys", None)))
            assert (await fetch(base, "web", made.secret))[0] == 503  # in: nothing ready
            await stub.RevokeServiceKey(
                SV.RevokeServiceKeyRequest(service="web", key_id=made.key.key_id), metadata=auth
            )
            await within(lambda: not getattr(route(second, "web"), "keys", True))
            assert (await fetch(base, "web", made.secret))[0] == 401

            spare = await new_key(api, api.consumer_tenant, types_pb2.ROLE_CONSUMER)
            assert (await fetch(base, "web", spare))[0] == 503  # cached on the second
            listed = await api.admin.ListApiKeys(
                admin_pb2.ListApiKeysRequest(tenant_id=api.consumer_tenant),
                metadata=api.auth(api.admin_key),
            )
            spare_id = next(k.key_id for k in listed.keys if spare.startswith(k.prefix))
            await api.admin.RevokeApiKey(
                admin_pb2.RevokeApiKeyRequest(key_id=spare_id), metadata=api.auth(api.admin_key)
            )
            started = time.monotonic()
            while (await fetch(base, "web", spare))[0] != 401:
                assert time.monotonic() - started < BOUND, "revoked on the first: 401 at once"
                await asyncio.sleep(0.01)

            await stub.DeleteService(SV.DeleteServiceRequest(service="web"), metadata=auth)
            await within(lambda: route(second, "web") is None)
        finally:
            await host.close()
