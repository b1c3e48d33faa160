"""Servers a benchmark run shares, started on first use in its temp dir and stopped at the end."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import docker

    from devstack import DockerEngine, LocalServer, NatsServer, PostgresCluster, S3Server


ROOT = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    """The environment for bench child processes: this checkout first on the import path."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


class Resources:
    """NATS, S3, PostgreSQL and a Docker engine (devstack, loopback only), each started once
    when a benchmark first asks for it; `close()` stops them newest first."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._started: list[LocalServer] = []
        self._nats: NatsServer | None = None
        self._s3: S3Server | None = None
        self._postgres: PostgresCluster | None = None
        self._docker: DockerEngine | None = None
        self._lock = asyncio.Lock()

    async def _start(self, server: LocalServer) -> None:
        await asyncio.to_thread(server.start)
        self._started.append(server)

    async def nats(self) -> NatsServer:
        from devstack import NatsServer

        async with self._lock:
            if self._nats is None:
                server = NatsServer(self.workdir / "nats")
                await self._start(server)
                self._nats = server
            return self._nats

    async def s3(self) -> S3Server:
        from devstack import S3Server

        async with self._lock:
            if self._s3 is None:
                server = S3Server(self.workdir / "s3", buckets=["gpuplane"])
                await self._start(server)
                self._s3 = server
            return self._s3

    async def postgres(self) -> PostgresCluster:
        from devstack import PostgresCluster

        async with self._lock:
            if self._postgres is None:
                server = PostgresCluster(self.workdir / "postgres")
                await self._start(server)
                self._postgres = server
            return self._postgres

    async def docker(self) -> tuple[DockerEngine, docker.DockerClient]:
        """The engine and a client, with the busybox test image present."""
        from devstack import DockerEngine, build_test_image

        async with self._lock:
            if self._docker is None:
                engine = DockerEngine(self.workdir / "docker")
                await self._start(engine)
                self._docker = engine
            client = self._docker.client()
            await asyncio.to_thread(build_test_image, client)
            return self._docker, client

    async def close(self) -> None:
        while self._started:
            server = self._started.pop()
            await asyncio.to_thread(server.stop)

    async def __aenter__(self) -> Resources:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class ServerProcess:
    """`python -m bench.servers KIND ...` as a child: `start()` returns its ready line."""

    def __init__(self, kind: str, log_path: Path, *args: str) -> None:
        self.argv = [sys.executable, "-m", "bench.servers", kind, *args]
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 60.0, secret: str = "") -> dict[str, Any]:
        """Starts the server (`secret`, if any, as its first line on stdin: not in argv) and
        returns its ready line."""
        log = self.log_path.open("ab")
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=child_env(),
            )
        finally:
            log.close()
        assert self.process.stdout is not None
        if secret:
            assert self.process.stdin is not None
            self.process.stdin.write(secret.encode() + b"\n")
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except TimeoutError:
            line = b""
        if not line:
            await self.stop()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(self.argv[2:4])} did not start:\n{tail}")
        ready: dict[str, Any] = json.loads(line)
        return ready

    @property
    def pid(self) -> int:
        """The server's process id (once started)."""
        assert self.process is not None, "not started"
        return self.process.pid

    async def stop(self) -> None:
        process = self.process
        if process is None:
            return
        self.process = None
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def __aenter__(self) -> ServerProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
