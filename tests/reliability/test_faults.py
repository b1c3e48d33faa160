"""Faults injected into the whole system (control plane, real daemons, Docker, NATS, S3): a daemon
killed between storing its results and reporting them, S3 unavailable while a job uploads, and
stored bytes that differ from the manifest. The control plane and the daemons (through the
grants it signs) reach S3 through a TCP proxy in this test, so "S3 is down" and "this response
never arrives" are switched on and off exactly."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import pytest
from gpuplane.v1 import jobs_pb2, ledger_pb2, types_pb2
from pydantic import SecretStr

from daemon.agent import Agent
from daemon.settings import DaemonSettings
from devstack import DockerEngine, NatsServer, S3Server
from storage import layout
from storage.objects import ObjectStore
from storage.upload import ManifestMismatch, verify_attempt
from tests.harness import CREDIT, JobPlane, job_plane
from tests.reliability import summary

S = types_pb2
pytestmark = [pytest.mark.timeout(90), pytest.mark.docker]


# The `key` field of a presigned POST's form: which object the request stores.
_FORM_KEY = re.compile(rb'name="key"\r\n\r\n([^\r]+)\r\n')


class S3Proxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server, with three switches:

    - `down()`: every connection (open or new) is closed at once, `refused` counts the new
      ones; `up()` forwards again.
    - `hold_response(pattern)`: the first connection whose request bytes match `pattern`
      gets no more response bytes (the request still reaches S3); `held` is set then.
    - `rewrite_response(old, new)`: `old` is replaced by `new` (same length) once, in the
      bytes S3 sends back.
    `requests` lists the request lines seen ("PUT /bucket/key"), and for a POST of a form
    the key it stores ("POST key").
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.refused = 0
        self.requests: list[str] = []
        self.held = asyncio.Event()
        self.rewritten = 0
        self._down = False
        self._hold: re.Pattern[bytes] | None = None
        self._rewrite: tuple[bytes, bytes] | None = None
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.down()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def down(self) -> None:
        self._down = True
        for writer in list(self._open):
            writer.transport.abort()

    def up(self) -> None:
        self._down = False

    def hold_response(self, pattern: bytes) -> None:
        self._hold = re.compile(pattern)

    def rewrite_response(self, old: bytes, new: bytes) -> None:
        assert len(old) == len(new)
        self._rewrite = (old, new)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._down:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._open.update({writer, up_writer})
        holding = asyncio.Event()
        try:
            await asyncio.gather(
                self._requests(reader, up_writer, holding),
                self._responses(up_reader, writer, holding),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for end in (writer, up_writer):
                self._open.discard(end)
                end.transport.abort()

    async def _requests(
        self, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter, holding: asyncio.Event
    ) -> None:
        while chunk := await reader.read(1 << 16):
            self.requests += [m.decode() for m in re.findall(rb"(?m)^[A-Z]+ /\S*", chunk)]
            self.requests += [f"POST {m.decode()}" for m in _FORM_KEY.findall(chunk)]
            # Decided before the request goes on, so no byte of its response gets through.
            if self._hold is not None and self._hold.search(chunk):
                self._hold = None
                holding.set()
                self.held.set()
            upstream.write(chunk)
            await upstream.drain()
        upstream.transport.abort()

    async def _responses(
        self, upstream: asyncio.StreamReader, writer: asyncio.StreamWriter, holding: asyncio.Event
    ) -> None:
        while chunk := await upstream.read(1 << 16):
            if holding.is_set():
                continue
            if self._rewrite is not None and self._rewrite[0] in chunk:
                chunk = chunk.replace(*self._rewrite)
                self._rewrite = None
                self.rewritten += 1
            writer.write(chunk)
            await writer.drain()
        writer.transport.abort()


@pytest.fixture
async def plane(
    tmp_path: Path, nats_server: NatsServer, s3_server: S3Server, proxy: S3Proxy
) -> AsyncIterator[JobPlane]:
    """The control plane reaches S3 through the proxy, so the storage grants it signs name the
    proxy: the daemons (which hold no S3 key) store through it too."""

    def through_proxy(options: dict[str, object]) -> None:
        options["s3_endpoint"] = proxy.endpoint

    async with job_plane(
        tmp_path / "cp", nats_server.url, s3_server, configure=through_proxy
    ) as running:
        yield running
        # The books balance and the consumer paid exactly what its jobs were charged.
        await running.assert_ledger_consistent()
        listed = await running.jobs.ListJobs(
            jobs_pb2.ListJobsRequest(page_size=100), metadata=running.auth(running.consumer_key)
        )
        charged = sum(j.charged_micro_credits for j in listed.jobs)
        balance = await running.balance(running.consumer_tenant)
        assert balance.available_micro_credits + balance.held_micro_credits == (
            100 * CREDIT - charged
        )


@pytest.fixture
async def proxy(s3_server: S3Server) -> AsyncIterator[S3Proxy]:
    running = S3Proxy(s3_server.port)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


def md5(data: bytes) -> bytes:
    return hashlib.md5(data).hexdigest().encode()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


async def assert_results_stored_once(plane: JobPlane, job: types_pb2.Job) -> int:
    """Every attempt's prefix lists each object once and verifies against its manifest;
    GetResults serves the final attempt's objects with matching SHA-256. Returns the number
    of objects checked."""
    store = plane.plane.store
    checked = 0
    for attempt in range(1, job.attempt + 1):
        listed = [o.key for o in await store.list(layout.attempt_prefix(job.job_id, attempt))]
        if not listed:
            continue
        assert len(listed) == len(set(listed))
        entries = await verify_attempt(store, job.job_id, attempt)
        assert sorted(listed) == sorted(
            [e.key for e in entries] + [layout.manifest_key(job.job_id, attempt)]
        )
        checked += len(entries)
    results = await plane.jobs.GetResults(
        jobs_pb2.GetResultsRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
    )
    for result in results.objects:
        assert result.key.startswith(layout.attempt_prefix(job.job_id, job.attempt))
        body = await asyncio.to_thread(fetch, result.url)
        assert hashlib.sha256(body).hexdigest() == result.sha256
        assert len(body) == result.size_bytes
    return checked


async def double_settlements(plane: JobPlane, job: types_pb2.Job) -> int:
    """Charges beyond one per attempt in the consumer's ledger entries for `job` (a short
    attempt is charged once, when it ends); also checks that what left the hold, charges and
    fees less refunds (a provider-fault attempt is refunded), is what the job was charged."""
    reply = await plane.ledger.ListEntries(
        ledger_pb2.ListEntriesRequest(tenant_id=plane.consumer_tenant, job_id=job.job_id),
        metadata=plane.auth(),
    )
    kinds = (S.TRANSFER_KIND_CHARGE, S.TRANSFER_KIND_FEE, S.TRANSFER_KIND_REFUND)
    held = [e for e in reply.entries if e.account_kind == S.ACCOUNT_KIND_HELD and e.kind in kinds]
    assert -sum(e.amount_micro_credits for e in held) == job.charged_micro_credits
    charges = Counter(e.attempt for e in held if e.kind == S.TRANSFER_KIND_CHARGE)
    return sum(n - 1 for n in charges.values())


def start_daemon_process(
    plane: JobPlane, token: str, data_dir: Path, engine: DockerEngine
) -> subprocess.Popen[bytes]:
    """`gpuplane daemon run` with one simulated GPU and no S3 key: it stores through the
    grants of its dispatches, which name the control plane's S3 endpoint (the proxy)."""
    gpuplane = Path(sys.executable).parent / "gpuplane"
    env = dict(os.environ, GPUPLANE_DAEMON_HEARTBEAT_INTERVAL_MS="200")
    log = (data_dir.parent / f"{data_dir.name}.log").open("ab")
    argv = [str(gpuplane), "daemon", "run", "--plaintext", "--control-plane", plane.address]
    argv += ["--token", token]
    argv += ["--data-dir", str(data_dir), "--simulate-gpus", "1xA100-80GB"]
    argv += ["--gpu-device-requests", "always", "--docker-host", engine.base_url]
    argv += ["--price-per-gpu-hour", "2"]
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


async def test_daemon_killed_after_storing_results_before_reporting_settles_once(
    plane: JobPlane,
    proxy: S3Proxy,
    tmp_path: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    test_image: str,
) -> None:
    token = await plane.token()
    data_dir = tmp_path / "daemon"
    daemon = start_daemon_process(plane, token, data_dir, docker_engine)
    restarted: subprocess.Popen[bytes] | None = None
    host_id = ""
    try:
        job = await plane.submit(
            image=test_image,
            command=["sh", "-c", "echo first > /output/result.txt; sleep 0.5"],
            gpu_count=1,
            max_retries=1,
        )
        # The window: manifest.json is the last object an attempt stores, and FINISHED is
        # sent only once its POST has been answered. The proxy lets that POST reach S3 and
        # swallows the answer, so the daemon is stuck between "stored" and "reported".
        proxy.hold_response(
            rb'name="key"\r\n\r\njobs/' + job.job_id.encode() + rb"/1/manifest\.json"
        )
        async with asyncio.timeout(40):
            await proxy.held.wait()
            while not await plane.plane.store.exists(layout.manifest_key(job.job_id, 1)):
                await asyncio.sleep(0.05)
        # The UPLOADING report went out before the upload; the control plane may apply it
        # a moment after the manifest lands.
        uploading = await plane.wait_for(job.job_id, [S.JOB_STATE_UPLOADING], timeout=10)
        host_id = uploading.host_id
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=10)
        print(
            f"killed the daemon with attempt 1 stored under {layout.attempt_prefix(job.job_id, 1)}"
        )

        restarted = start_daemon_process(plane, token, data_dir, docker_engine)
        done = await plane.wait_for(
            job.job_id, [S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED], timeout=40
        )
        assert done.state == S.JOB_STATE_SUCCEEDED, done.state_reason
        assert done.host_id == host_id  # the same machine came back as the same host
        attempts = {a.attempt: a for a in done.attempts}
        print({n: (a.reason, a.charged_micro_credits) for n, a in attempts.items()})
        # The killed attempt is the provider's fault: not charged; the job is charged once.
        assert done.attempt == 2
        assert attempts[1].charged_micro_credits == 0
        assert attempts[2].charged_micro_credits == done.charged_micro_credits > 0
        checked = await assert_results_stored_once(plane, done)
        doubled = await double_settlements(plane, done)
        assert doubled == 0
    finally:
        for process in (daemon, restarted):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        if host_id:
            for container in docker_client.containers.list(
                all=True, filters={"label": f"gpuplane.host={host_id}"}
            ):
                container.remove(force=True)
    summary.record(
        "kill -9 daemon between storing results and reporting them",
        f"1 fault, 2 attempts, {checked} stored objects verified, charged once",
        faults_injected=1,
        jobs_run=1,
        double_settlements=doubled,
    )


async def test_s3_down_while_uploading_then_back_and_corruption_is_caught(
    plane: JobPlane,
    proxy: S3Proxy,
    tmp_path: Path,
    docker_engine: DockerEngine,
    s3_server: S3Server,
    test_image: str,
) -> None:
    token = await plane.token()
    # S3 itself, not through the proxy (the control plane's store is behind it).
    direct = ObjectStore(
        s3_server.endpoint, s3_server.access_key, s3_server.secret_key, bucket="gpuplane"
    )
    agent = Agent(
        DaemonSettings(
            control_plane=plane.address,
            plaintext=True,
            registration_token=SecretStr(token),
            data_dir=tmp_path / "daemon",
            simulate_gpus="1xA100-80GB",
            gpu_device_requests="always",
            docker_host=docker_engine.base_url,
            heartbeat_interval_ms=200,
            reconnect_max_seconds=1.0,
            upload_attempts=12,
            upload_retry_base_seconds=0.2,
        )
    )
    await agent.start()
    try:
        payload = f"payload-{time.time_ns()}"
        job = await plane.submit(
            image=test_image,
            command=["sh", "-c", f"printf {payload} > /output/result.txt; sleep 1"],
            gpu_count=1,
        )
        await plane.wait_for(job.job_id, [S.JOB_STATE_RUNNING], timeout=30)
        proxy.down()  # before the container exits: every upload try meets a closed door
        await plane.wait_for(job.job_id, [S.JOB_STATE_UPLOADING], timeout=30)
        async with asyncio.timeout(30):
            while proxy.refused < 6:  # two tries at least (each with the SDK's own retries)
                assert (await plane.get(job.job_id)).state == S.JOB_STATE_UPLOADING
                await asyncio.sleep(0.05)
        assert not await direct.exists(layout.manifest_key(job.job_id, 1))
        refused = proxy.refused
        # Back up, but S3's answer to the POST of result.txt names other bytes (the ETag, the
        # MD5 of what it stored): the daemon's check must reject that try and store it again.
        proxy.rewrite_response(md5(payload.encode()), md5(payload.upper().encode()))
        proxy.up()
        done = await plane.wait_for(
            job.job_id, [S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED], timeout=40
        )
        assert done.state == S.JOB_STATE_SUCCEEDED, done.state_reason
        assert proxy.rewritten == 1
        puts = [r for r in proxy.requests if r.startswith("POST") and "output/result.txt" in r]
        assert len(puts) >= 2, proxy.requests  # stored again after the mismatch
        print(f"{refused} connections refused while down; PUTs of result.txt: {len(puts)}")
        checked = await assert_results_stored_once(plane, done)
        doubled = await double_settlements(plane, done)
        assert doubled == 0
    finally:
        await agent.stop()

    # At rest: bytes changed behind the manifest's back are caught by the same check.
    store = direct
    key = layout.output_key(job.job_id, 1, "result.txt")
    await store.put_bytes(key, payload.upper().encode())
    with pytest.raises(ManifestMismatch, match=re.escape(key)):
        await verify_attempt(store, job.job_id, 1)
    summary.record(
        "S3 down during upload; corrupted bytes",
        f"{refused} refused connections, 1 corrupted store answer, 1 corrupted object at rest: "
        f"job stayed UPLOADING, then SUCCEEDED with {checked} verified objects",
        faults_injected=3,
        jobs_run=1,
        double_settlements=doubled,
    )
