"""Tunnels across replicas and through their faults (PostgreSQL, two control planes, a real
`gpuplane daemon run` connected to B only): an exec taken by replica A reaches the daemon
through B's command delivery and comes back to A; A killed with -9 ends the client's call with
UNAVAILABLE at once, the daemon closes the exec, the job keeps running and an exec through B
works; the daemon killed with -9 ends an exec's call with UNAVAILABLE at once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from gpuplane.v1 import tunnels_pb2, tunnels_pb2_grpc, types_pb2

from daemon.channel import PLAINTEXT, open_channel
from devstack import DockerEngine, S3Server
from tests.controlplane.scheduler.planes import fleet, plane_options, until
from tests.e2e.tunnelstack import CLI, TunnelStack
from tests.serving import stop_process

pytestmark = [pytest.mark.timeout(120), pytest.mark.docker, pytest.mark.postgres, pytest.mark.slow]
T = tunnels_pb2
MARK = "/tmp/exec-closed"


async def requests_until(start: T.ExecRequest, stop: asyncio.Event) -> AsyncIterator[Any]:
    yield start
    await stop.wait()


async def test_exec_through_another_replica_survives_its_death(
    tmp_path: Path,
    pg_url: str,
    nats_server: Any,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    test_image: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    options = plane_options(pg_url, nats_server, s3_server, command_poll_interval_ms=100)
    async with fleet(tmp_path, options, monkeypatch) as planes:
        b = await planes.start("b")
        a = planes.spawn("a")
        daemon = daemon_process(tmp_path, b.api.address, await b.api.token(), docker_engine)
        channel_a = open_channel(f"127.0.0.1:{a.port}", PLAINTEXT)
        try:
            job = await b.api.submit(image=test_image, command=["sleep", "300"], gpu_count=1)
            running = await b.api.wait_for(job.job_id, [types_pb2.JOB_STATE_RUNNING], 60)
            via_b = TunnelStack(b.api, running)
            await until(lambda: a_serves(channel_a, b.api.consumer_key), 30, "A serves")
            via_a = tunnels_pb2_grpc.TunnelServiceStub(channel_a)
            auth = b.api.auth(b.api.consumer_key)

            # Through A, whose replica does not hold the daemon's stream.
            start = T.ExecStart(
                job_id=job.job_id,
                command=["sh", "-c", f"echo open $$; cat; echo x > {MARK}"],
                stdin=True,
            )
            stop = asyncio.Event()
            call = via_a.Exec(requests_until(T.ExecRequest(start=start), stop), metadata=auth)
            first = await asyncio.wait_for(call.read(), 20)
            assert isinstance(first, T.ExecResponse)
            said, pid = first.stdout.decode().split()
            assert said == "open"

            a.kill()
            began = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await asyncio.wait_for(call.read(), 10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - began < 5

            # The daemon's call to A broke: it closed the exec. Its shell ends either way: cat
            # reads end-of-file and the shell leaves its mark, or (a loaded machine, where the
            # end-of-file took longer than the hang-up grace) the hang-up ends it.
            async def closed() -> bool:
                probe = f"test -d /proc/{pid} && echo running || echo ended; cat {MARK}"
                out, _, _ = await via_b.exec(["sh", "-c", probe], key=b.api.consumer_key)
                return out.startswith(b"ended")

            await until(closed, 20, "the exec closed on the daemon")
            still = await b.api.get(job.job_id)
            assert still.state == types_pb2.JOB_STATE_RUNNING
            stop.set()

            # Through B; then the daemon dies.
            stop = asyncio.Event()
            start = T.ExecStart(
                job_id=job.job_id, command=["sh", "-c", "echo open; cat"], stdin=True
            )
            via = tunnels_pb2_grpc.TunnelServiceStub(b.api.channel)
            call = via.Exec(requests_until(T.ExecRequest(start=start), stop), metadata=auth)
            first = await asyncio.wait_for(call.read(), 20)
            assert isinstance(first, T.ExecResponse)
            assert first.stdout == b"open\n"
            daemon.kill()
            began = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await asyncio.wait_for(call.read(), 10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "daemon went away" in (caught.value.details() or "")
            assert time.monotonic() - began < 5
            stop.set()
        finally:
            await channel_a.close(None)
            stop_process(daemon)


def daemon_process(
    tmp_path: Path, address: str, token: str, engine: DockerEngine
) -> subprocess.Popen[bytes]:
    argv = [*CLI, "daemon", "run", "--plaintext", "--control-plane", address, "--token", token]
    argv += ["--data-dir", str(tmp_path / "daemon"), "--docker-host", engine.base_url]
    argv += ["--simulate-gpus", "1xA100-80GB", "--gpu-device-requests", "always"]
    env = {**os.environ, "GPUPLANE_DAEMON_HEARTBEAT_INTERVAL_MS": "200"}
    with (tmp_path / "daemon.log").open("wb") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


async def a_serves(channel: grpc.aio.Channel, key: str) -> bool:
    """Whether the spawned replica answers (an exec of no job: NOT_FOUND)."""
    stub = tunnels_pb2_grpc.TunnelServiceStub(channel)
    start = T.ExecRequest(start=T.ExecStart(job_id="job_none", command=["true"]))
    call = stub.Exec(iter([start]), metadata=(("authorization", f"Bearer {key}"),))
    try:
        await asyncio.wait_for(call.read(), 2)
    except grpc.aio.AioRpcError as exc:
        return exc.code() == grpc.StatusCode.NOT_FOUND
    except TimeoutError:
        return False
    finally:
        call.cancel()
    return False
