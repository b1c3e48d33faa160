"""Several control planes on one PostgreSQL database: in-process ones, and `gpuplane
controlplane serve` child processes that a test can SIGKILL or SIGSTOP for real."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from gpuplane.v1 import types_pb2

from controlplane.db import migrate
from controlplane.db.engine import Database
from controlplane.errors import NotLeader
from controlplane.scheduler.leader import PostgresLeader
from controlplane.server import ControlPlane
from controlplane.settings import Settings
from devstack import free_port
from devstack.factories import new_tenant
from tests.controlplane.scheduler.probes import lease
from tests.controlplane.scripted_host import ScriptedHost, scripted_host
from tests.harness import JobPlane, open_plane

PRICE = 2_000_000


def plane_options(database_url: str, nats: Any, s3: Any, **overrides: Any) -> dict[str, Any]:
    """Settings every plane of a test shares (one admin key for all: the first plane's)."""
    options: dict[str, Any] = {
        "database_url": database_url,
        "nats_url": nats.url,
        "s3_endpoint": s3.endpoint,
        "s3_access_key": s3.access_key,
        "s3_secret_key": s3.secret_key,
        "bootstrap_admin_key": f"gpk_{secrets.token_urlsafe(32)}",
        "listen_addr": "127.0.0.1:0",
        "metrics_addr": "",
        "heartbeat_interval_ms": 200,
        "heartbeat_timeout_ms": 5000,
        "scheduler_interval_ms": 100,
        "scheduler_leader_check_interval_ms": 200,
        "scheduler_lease_ttl_ms": 3000,
        # Scripted hosts report simulated run times (an hour within a second): the control
        # plane's clock bound (jobs/clock.py) is off here; its own tests set the default back.
        "run_time_slack_ms": 86_400_000,
        "allow_simulated_by_default": True,
        "allow_unverified_by_default": True,  # simulated hosts are never verified
        "allow_plaintext": True,
    }
    options.update(overrides)
    return options


async def until(
    condition: Callable[[], Awaitable[bool] | bool], timeout: float, what: str
) -> float:
    """Polls `condition` until it holds; returns the seconds that took."""
    started = time.monotonic()
    while True:
        value = condition()
        if await value if isinstance(value, Awaitable) else value:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


@dataclass
class PlacementCounter:
    """Wraps one plane's Scheduler.run_once: what that plane placed, and how often its
    fence refused a cycle."""

    run_once: Callable[[], Awaitable[int]]
    placed: int = 0
    fenced: int = 0

    async def __call__(self) -> int:
        try:
            placed = await self.run_once()
        except NotLeader:
            self.fenced += 1
            raise
        self.placed += placed
        return placed


@dataclass
class InProcessPlane:
    plane: ControlPlane
    api: JobPlane
    counter: PlacementCounter
    exits: contextlib.AsyncExitStack  # closes the channel, then stops the plane

    @property
    def db(self) -> Database:
        assert self.plane.db is not None
        return self.plane.db

    @property
    def leading(self) -> bool:
        return self.plane.leader is not None and self.plane.leader.leading

    @property
    def lock_pid(self) -> int | None:
        """The server pid of its lock connection (None before its first try)."""
        leader = self.plane.leader
        return leader.backend_pid if isinstance(leader, PostgresLeader) else None

    def gauge(self) -> float | None:
        return self.plane.metrics.registry.get_sample_value("gpuplane_scheduler_leader")


@dataclass
class Fleet:
    """The planes of one test; the first in-process one creates the tenants."""

    tmp_path: Path
    options: dict[str, Any]
    monkeypatch: pytest.MonkeyPatch
    db: Database  # the shared database, for probes
    planes: list[InProcessPlane] = field(default_factory=list)
    processes: list[PlaneProcess] = field(default_factory=list)
    hosts: list[ScriptedHost] = field(default_factory=list)
    tenants: tuple[str, str, str] | None = None  # consumer id, consumer key, provider id

    @property
    def admin_key(self) -> str:
        return str(self.options["bootstrap_admin_key"])

    async def start(self, name: str, **overrides: Any) -> InProcessPlane:
        settings = Settings(**{**self.options, "data_dir": self.tmp_path / name, **overrides})
        exits = contextlib.AsyncExitStack()
        api = await exits.enter_async_context(open_plane(settings))
        plane = api.plane
        await asyncio.wait_for(plane.bus.ready.wait(), timeout=15)
        assert plane.background is not None
        counter = PlacementCounter(plane.background.scheduler.run_once)
        self.monkeypatch.setattr(plane.background.scheduler, "run_once", counter)
        if self.tenants is None:
            consumer, key = await new_tenant(api, "consumer", types_pb2.ROLE_CONSUMER)
            provider, _ = await new_tenant(api, "provider", types_pb2.ROLE_PROVIDER)
            await api.deposit(consumer, 100, "initial")
            self.tenants = (consumer, key, provider)
        api.consumer_tenant, api.consumer_key, api.provider_tenant = self.tenants
        running = InProcessPlane(plane, api, counter, exits)
        self.planes.append(running)
        return running

    def spawn(self, name: str, **overrides: Any) -> PlaneProcess:
        """`gpuplane controlplane serve` as a child process with the shared settings."""
        data_dir = self.tmp_path / name
        data_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPLANE_")}
        options = {**self.options, "data_dir": data_dir, **overrides}
        options["listen_addr"] = f"127.0.0.1:{port}"
        for key, value in options.items():
            env[f"GPUPLANE_{key.upper()}"] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
        log = data_dir / "serve.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "gpuplane_cli.main", "controlplane", "serve"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        spawned = PlaneProcess(process, log, port)
        self.processes.append(spawned)
        return spawned

    async def host(self, plane: InProcessPlane, gpus: int) -> ScriptedHost:
        """A scripted host (no Docker) connected to `plane`."""
        host = await scripted_host(plane.api, gpus=gpus, price=PRICE)
        self.hosts.append(host)
        return host

    async def stop(self, running: InProcessPlane) -> None:
        """A graceful shutdown of one in-process plane."""
        self.planes.remove(running)
        await running.exits.aclose()

    async def close(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(Exception):
                await host.close()
        for running in reversed(self.planes):
            await self.stop(running)
        for spawned in self.processes:
            spawned.kill()
        await self.db.close()


@dataclass
class PlaneProcess:
    process: subprocess.Popen[bytes]
    log: Path
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no handover, no cleanup; the OS closes its sockets."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)

    async def wait_leading(self, db: Database, timeout: float = 30.0) -> None:
        """Until the lease names this process as its holder."""

        async def holds() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"control plane exited:\n{self.output()}")
            current = await lease(db)
            return current is not None and current[1].split("/")[1] == str(self.pid)

        try:
            await until(holds, timeout, f"process {self.pid} leads")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.output()}") from None


@contextlib.asynccontextmanager
async def fleet(
    tmp_path: Path, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Fleet]:
    """Planes on `options`' database, migrated first (replicas must not race to migrate)."""
    url = str(options["database_url"])
    await asyncio.to_thread(migrate.upgrade, url)
    running = Fleet(tmp_path, options, monkeypatch, Database(url))
    try:
        yield running
    finally:
        await running.close()
