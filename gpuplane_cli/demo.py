"""`gpuplane up --demo`: a local daemon, credits, and one job run end to end with its cost."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from gpuplane.v1 import admin_pb2, jobs_pb2, ledger_pb2, registry_pb2, types_pb2

from daemon.channel import PLAINTEXT
from gpuplane_cli import follow
from gpuplane_cli.client import EXIT_UNIMPLEMENTED, Client, CliError, Context, Target
from gpuplane_cli.stackinfo import DemoKeys
from gpuplane_cli.units import format_credits
from messaging.tasks import timed

if TYPE_CHECKING:
    from daemon.agent import Agent
    from devstack import DockerEngine
    from gpuplane_cli.up import Stack

log = logging.getLogger(__name__)

SIMULATED_GPUS = "2xA100-80GB"
DEMO_CREDITS = 100 * 1_000_000
DAEMON_START_TIMEOUT = 120.0
DEMO_SCRIPT = (
    "echo 'hello from a gpuplane job'; "
    'echo "GPUs: ${NVIDIA_VISIBLE_DEVICES:-none}"; '
    "echo 'the answer is 42' > /output/result.txt; "
    "sha256sum /output/result.txt"
)


def _context(stack: Stack, key: str) -> Context:
    args = argparse.Namespace(
        addr=stack.addr, api_key=key, json=False, timeout=30.0, plaintext=True
    )
    return Context(args=args, environ={})


def _not_built(what: str, error: grpc.RpcError) -> CliError:
    return CliError(
        f"`gpuplane up --demo` needs {what}, which this build does not have yet "
        f"({error.code().name}: {error.details()}). The stack itself works: run `gpuplane up` "
        "without --demo.",
        EXIT_UNIMPLEMENTED,
    )


@dataclass
class LocalDaemon:
    """The demo's provider daemon and the Docker engine it uses, when the demo started one."""

    agent: Agent | None = None
    engine: DockerEngine | None = None
    docker_url: str = ""

    async def stop(self) -> None:
        if self.agent is not None:
            with timed(log, "stopping: the demo daemon"):
                await self.agent.stop()
            self.agent = None
        if self.engine is not None:
            with timed(log, "stopping: the demo's Docker engine"):
                await asyncio.to_thread(self.engine.stop)
            self.engine = None


def _agent_module() -> Any:
    try:
        return importlib.import_module("daemon.agent")
    except ModuleNotFoundError as exc:
        if exc.name not in ("daemon.agent", "daemon"):
            raise
        raise CliError(
            "`gpuplane up --demo` needs the provider daemon (module daemon.agent), which is not "
            "built yet. The stack itself works: run `gpuplane up` without --demo.",
            EXIT_UNIMPLEMENTED,
        ) from None


async def mint_token(stack: Stack, keys: DemoKeys) -> str:
    client = Client(Target(stack.addr, stack.admin_key, 30.0, PLAINTEXT))
    try:
        request = admin_pb2.CreateRegistrationTokenRequest(
            provider_tenant_id=keys.provider_tenant, label="gpuplane up --demo", max_uses=0
        )
        response = await client.call(client.admin.CreateRegistrationToken, request)
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
            raise _not_built("AdminService.CreateRegistrationToken", exc) from None
        raise
    finally:
        await client.close()
    return response.secret


def _docker_for_demo(stack: Stack, daemon: LocalDaemon) -> str:
    """A Docker engine with the busybox test image: the default one when it answers, else a
    private one started in the data dir (as root with dockerd installed)."""
    import docker
    from docker.errors import DockerException

    from devstack import DevstackError, DockerEngine, build_test_image

    try:
        client = docker.from_env(timeout=10)
        client.ping()
        url = str(client.api.base_url)
    except DockerException:
        engine = DockerEngine(stack.data_dir / "docker")
        try:
            engine.start()
        except DevstackError as exc:
            raise CliError(f"the demo needs a Docker engine and none is reachable: {exc}") from None
        daemon.engine = engine
        client, url = engine.client(), engine.base_url
    build_test_image(client)
    client.close()
    return url


def _simulate_gpus() -> str | None:
    """None when NVML finds real GPUs (the daemon then uses them), else the simulated set."""
    from daemon.gpus import NoGpuError, nvml_gpus

    try:
        nvml_gpus()
    except NoGpuError as exc:
        log.info("no usable NVIDIA GPU (%s): the demo daemon simulates %s", exc, SIMULATED_GPUS)
        return SIMULATED_GPUS
    return None


async def start_daemon(stack: Stack, token: str, daemon: LocalDaemon) -> None:
    """Starts a daemon for the demo provider on this machine; returns once it has registered
    and connected (its Docker engine and test image ready)."""
    module = _agent_module()
    from pydantic import SecretStr

    from daemon.settings import DaemonSettings

    assert stack.s3 is not None
    daemon.docker_url = await asyncio.to_thread(_docker_for_demo, stack, daemon)
    settings = DaemonSettings(
        control_plane=stack.addr,
        plaintext=True,  # the embedded stack's control plane on loopback
        registration_token=SecretStr(token),
        data_dir=stack.data_dir / "daemon",
        simulate_gpus=await asyncio.to_thread(_simulate_gpus),
        docker_host=daemon.docker_url,
        labels={"demo": "true"},
    )
    agent: Agent = module.Agent(settings)
    daemon.agent = agent
    try:
        await asyncio.wait_for(agent.start(), DAEMON_START_TIMEOUT)
    except TimeoutError:
        log_file = stack.data_dir / "logs" / "gpuplane.log"
        raise CliError(
            f"the demo daemon did not start within {DAEMON_START_TIMEOUT:.0f}s; {log_file} "
            "says what it waited for"
        ) from None


async def wait_for_host(stack: Stack, timeout: float = 30.0) -> None:
    client = Client(Target(stack.addr, stack.admin_key, 10.0, PLAINTEXT))
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while True:
            request = registry_pb2.ListHostsRequest(states=[types_pb2.HOST_STATE_ONLINE])
            hosts = (await client.call(client.registry.ListHosts, request)).hosts
            if hosts:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise CliError(f"the demo daemon did not come online within {timeout:.0f}s")
            await asyncio.sleep(0.2)
    finally:
        await client.close()


async def fund(stack: Stack, keys: DemoKeys) -> None:
    """Tops the consumer up to DEMO_CREDITS available."""
    client = Client(Target(stack.addr, stack.admin_key, 30.0, PLAINTEXT))
    try:
        request = ledger_pb2.GetBalanceRequest(tenant_id=keys.consumer_tenant)
        balance = (await client.call(client.ledger.GetBalance, request)).balance
        missing = DEMO_CREDITS - balance.available_micro_credits
        if missing > 0:
            deposit = ledger_pb2.DepositRequest(
                tenant_id=keys.consumer_tenant,
                amount_micro_credits=missing,
                reference="gpuplane up --demo",
                idempotency_key=f"gpuplane-up/demo-deposit/{uuid.uuid4()}",
            )
            await client.call(client.ledger.Deposit, deposit)
            print(f"deposited {format_credits(missing)} credits for {keys.consumer_tenant}")
    finally:
        await client.close()


async def run_demo(stack: Stack, keys: DemoKeys) -> None:
    """Mints a token, starts a daemon, funds the consumer, runs one job and reports it."""
    from devstack import TEST_IMAGE

    token = await mint_token(stack, keys)
    print("starting a local daemon …", flush=True)
    daemon = LocalDaemon()
    stack.on_stop.append(daemon.stop)
    await start_daemon(stack, token, daemon)
    await wait_for_host(stack)
    await fund(stack, keys)
    consumer = _context(stack, keys.consumer_key)
    client = consumer.client()
    spec = types_pb2.JobSpec(
        image=TEST_IMAGE,
        args=["sh", "-c", DEMO_SCRIPT],
        gpu_count=1,
        max_duration_seconds=300,
        allow_simulated=True,
        allow_unverified=True,
        labels={"demo": "true"},
    )
    try:
        submitted = await client.call(client.jobs.SubmitJob, jobs_pb2.SubmitJobRequest(spec=spec))
        job_id = submitted.job.job_id
        print(f"submitted demo job {job_id}", flush=True)
        await follow.wait_for_job(consumer, job_id)
        job = (await client.call(client.jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id))).job
        if job.state == types_pb2.JOB_STATE_SUCCEEDED:
            await _download(consumer, stack, job_id)
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
            raise _not_built("the job path (JobService)", exc) from None
        raise
    finally:
        await consumer.close()
    await _report(stack, keys, job)


async def _download(consumer: Context, stack: Stack, job_id: str) -> None:
    """Fetches the job's results through their presigned URLs (sha256 checked) and shows
    /output/result.txt."""
    client = consumer.client()
    results = await client.call(client.jobs.GetResults, jobs_pb2.GetResultsRequest(job_id=job_id))
    target = stack.data_dir / "demo-results" / job_id
    await follow.download_all(results, target, quiet=True)
    print(f"downloaded {len(results.objects)} result files to {target} (sha256 verified)")
    for path in sorted(target.rglob("result.txt")):
        print(f"{path.relative_to(target)}: {path.read_text().strip()}")


async def _report(stack: Stack, keys: DemoKeys, job: types_pb2.Job) -> None:
    admin = Client(Target(stack.addr, stack.admin_key, 30.0, PLAINTEXT))
    try:
        request = ledger_pb2.GetBalanceRequest(tenant_id=keys.provider_tenant)
        earned = (await admin.call(admin.ledger.GetBalance, request)).balance
    finally:
        await admin.close()
    print(f"job cost: {format_credits(job.charged_micro_credits)} credits", flush=True)
    print(
        f"provider {keys.provider_tenant} earnings: "
        f"{format_credits(earned.earnings_micro_credits)} credits",
        flush=True,
    )
