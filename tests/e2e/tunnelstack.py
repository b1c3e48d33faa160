"""One running workload for the tunnel tests: a control plane, a real daemon, a busybox job
serving HTTP on 8080 and a TCP echo on 7000 inside a container with network none."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from gpuplane.v1 import tunnels_pb2, tunnels_pb2_grpc, types_pb2
from pydantic import SecretStr

from daemon.agent import Agent
from daemon.runtime import LABEL_HOST
from daemon.settings import DaemonSettings
from devstack import DockerEngine, NatsServer, S3Server
from devstack.docker_engine import remove_containers
from tests.harness import JobPlane, job_plane

T = tunnels_pb2
HTTP_PORT = 8080
ECHO_PORT = 7000
INDEX = b"hello through the tunnel\n"
SCRIPT = (
    "mkdir -p /tmp/www && printf 'hello through the tunnel\\n' > /tmp/www/index.html && "
    f"httpd -p 127.0.0.1:{HTTP_PORT} -h /tmp/www && "
    f"(nc -ll -p {ECHO_PORT} -e cat &) && {{extra}}echo ready && sleep 3600"
)


@dataclass
class TunnelStack:
    plane: JobPlane
    job: types_pb2.Job
    # The daemon, when it runs in this process.
    agent: Agent | None = None

    @property
    def tunnels(self) -> tunnels_pb2_grpc.TunnelServiceAsyncStub:
        return tunnels_pb2_grpc.TunnelServiceStub(self.plane.channel)

    async def exec(
        self,
        command: list[str],
        stdin: Iterable[bytes] = (),
        *,
        key: str = "",
        job_id: str = "",
    ) -> tuple[bytes, bytes, int | None]:
        """Runs `command` (non-interactive): stdout, stderr and the exit code."""
        requests = [
            T.ExecRequest(
                start=T.ExecStart(job_id=job_id or self.job.job_id, command=command, stdin=True)
            ),
            *(T.ExecRequest(stdin=chunk) for chunk in stdin),
            T.ExecRequest(stdin_closed=True),
        ]
        call = self.tunnels.Exec(
            aiter_of(requests), metadata=self.plane.auth(key or self.plane.consumer_key)
        )
        out, err, code = bytearray(), bytearray(), None
        async for response in call:
            kind = response.WhichOneof("msg")
            if kind == "stdout":
                out += response.stdout
            elif kind == "stderr":
                err += response.stderr
            elif kind == "exit_code":
                code = response.exit_code
        return bytes(out), bytes(err), code


async def aiter_of(items: list[T.ExecRequest]) -> AsyncIterator[T.ExecRequest]:
    for item in items:
        yield item


@asynccontextmanager
async def tunnel_stack(
    data_dir: Path,
    nats: NatsServer,
    s3: S3Server,
    engine: DockerEngine,
    image: str,
    extra: str = "",
) -> AsyncIterator[TunnelStack]:
    """The stack; `extra`: more of the job's script (a command ending in `&&`)."""
    async with job_plane(data_dir / "cp", nats.url, s3) as plane:
        token = await plane.token()
        agent = Agent(
            DaemonSettings(
                control_plane=plane.address,
                plaintext=True,
                registration_token=SecretStr(token),
                data_dir=data_dir / "daemon",
                simulate_gpus="2xA100-80GB",
                gpu_device_requests="always",
                docker_host=engine.base_url,
                heartbeat_interval_ms=200,
                reconnect_max_seconds=1.0,
                price_per_gpu_hour_micro_credits=2_000_000,
            )
        )
        await agent.start()
        try:
            script = SCRIPT.format(extra=extra)
            job = await plane.submit(image=image, command=["sh", "-c", script], gpu_count=1)
            running = await plane.wait_for(job.job_id, [types_pb2.JOB_STATE_RUNNING], 60)
            yield TunnelStack(plane, running, agent)
        finally:
            host_id = agent.host_id
            await agent.stop()
            # A stopped daemon leaves its containers for the next start to adopt; this
            # stack's are removed, with what was exec'd in them (a `cat /dev/zero` left
            # behind kept a core busy for the rest of the suite).
            if host_id:
                await asyncio.to_thread(_remove_containers, engine, host_id)


def _remove_containers(engine: DockerEngine, host_id: str) -> None:
    client = engine.client()
    try:
        remove_containers(client, f"{LABEL_HOST}={host_id}")
    finally:
        client.close()


async def wait_listening(stack: TunnelStack, port: int) -> None:
    """Until something listens on `port` in the job's container (its script started it)."""
    for _ in range(100):
        out, _, _ = await stack.exec(["sh", "-c", f"netstat -ltn | grep -c ':{port} '"])
        if out.strip() not in (b"", b"0"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"nothing listens on {port} in the container")


def cli_env(stack: TunnelStack) -> dict[str, str]:
    """The environment a `gpuplane` process reaches the stack's control plane with."""
    return {
        **os.environ,
        "GPUPLANE_ADDR": stack.plane.address,
        "GPUPLANE_API_KEY": stack.plane.consumer_key,
        "GPUPLANE_PLAINTEXT": "1",
    }


CLI = [sys.executable, "-m", "gpuplane_cli.main"]
