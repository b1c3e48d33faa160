"""Two control planes on one PostgreSQL and a real daemon connected to the second (B) only:
a drain and a cancel issued on the first (A) reach it, it acknowledges them, and a command
sent again is answered again without being acted on twice."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from gpuplane.v1 import jobs_pb2, registry_pb2, registry_pb2_grpc, types_pb2
from pydantic import SecretStr
from sqlalchemy import select, update

from controlplane.commands.models import HostCommand
from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from daemon.agent import Agent
from daemon.settings import DaemonSettings
from devstack import DockerEngine, S3Server
from tests.controlplane.scheduler.planes import fleet, plane_options, until

pytestmark = [pytest.mark.timeout(120), pytest.mark.docker, pytest.mark.postgres]
S = types_pb2


async def commands_of(db: Database, host_id: str, kind: str) -> Sequence[HostCommand]:
    async with db.read() as session:
        query = select(HostCommand).where(HostCommand.host_id == host_id, HostCommand.kind == kind)
        return (await session.scalars(query.order_by(HostCommand.id))).all()


async def all_applied(db: Database, host_id: str, kind: str, count: int) -> bool:
    rows = await commands_of(db, host_id, kind)
    return len(rows) == count and all(r.answer == "applied" for r in rows)


async def test_drain_and_cancel_issued_on_a_reach_a_daemon_connected_to_b(
    tmp_path: Path,
    pg_url: str,
    nats_server: Any,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    test_image: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    options = plane_options(
        pg_url, nats_server, s3_server, command_poll_interval_ms=100, command_resend_ms=500
    )
    async with fleet(tmp_path, options, monkeypatch) as planes:
        a = await planes.start("a")
        b = await planes.start("b")
        agent = Agent(
            DaemonSettings(
                control_plane=f"127.0.0.1:{b.plane.port}",
                plaintext=True,
                registration_token=SecretStr(await a.api.token()),
                data_dir=tmp_path / "daemon",
                simulate_gpus="1xA100-80GB",
                gpu_device_requests="always",
                docker_host=docker_engine.base_url,
                heartbeat_interval_ms=200,
                reconnect_base_seconds=0.2,
                reconnect_max_seconds=1.0,
            )
        )
        await agent.start()
        assert a.plane.registry is not None
        assert b.plane.registry is not None
        stub = registry_pb2_grpc.RegistryServiceStub(a.api.channel)
        try:
            streams = b.plane.registry.streams
            await until(lambda: streams.connected(agent.host_id), 15, "the daemon is on B")
            assert not a.plane.registry.streams.connected(agent.host_id)

            await stub.DrainHost(
                registry_pb2.DrainHostRequest(host_id=agent.host_id, reason="maintenance"),
                metadata=a.api.auth(),
            )
            await until(lambda: agent.draining, 10, "the daemon hears the drain")
            assert agent.drain_reason == "maintenance"
            await until(lambda: all_applied(planes.db, agent.host_id, "drain", 1), 10, "acked")
            await stub.UndrainHost(
                registry_pb2.UndrainHostRequest(host_id=agent.host_id), metadata=a.api.auth()
            )
            await until(lambda: not agent.draining, 10, "the daemon hears the undrain")
            await until(lambda: all_applied(planes.db, agent.host_id, "drain", 2), 10, "acked")

            # The first drain's ack "lost": sent again, answered again, not acted on (the
            # host stays undrained).
            drain = (await commands_of(planes.db, agent.host_id, "drain"))[0]
            assert agent.connect is not None
            repeated = agent.connect.commands_repeated
            async with planes.db.transaction() as session:
                await session.execute(
                    update(HostCommand)
                    .where(HostCommand.id == drain.id)
                    .values(acked_at=None, answer=None, due_at=utcnow())
                )
            await until(lambda: all_applied(planes.db, agent.host_id, "drain", 2), 10, "again")
            assert agent.connect.commands_repeated == repeated + 1
            assert not agent.draining

            job = await a.api.submit(image=test_image, command=["sleep", "60"], gpu_count=1)
            await a.api.wait_for(job.job_id, [S.JOB_STATE_RUNNING], timeout=60)
            await a.api.jobs.CancelJob(
                jobs_pb2.CancelJobRequest(job_id=job.job_id, reason="not needed"),
                metadata=a.api.auth(a.api.consumer_key),
            )
            done = await a.api.wait_for(job.job_id, [S.JOB_STATE_CANCELLED], timeout=30)
            assert done.state_reason == "cancelled: not needed"
            assert done.host_id == agent.host_id
            await until(lambda: all_applied(planes.db, agent.host_id, "cancel", 1), 10, "acked")
            await a.api.assert_ledger_consistent()
        finally:
            await agent.stop()
