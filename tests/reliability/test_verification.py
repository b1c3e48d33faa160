"""Hostile providers against hardware verification: a host claiming H100s it does not have
(a forged product, NVML facts no H100 has, a late or no answer) stays unverified and gets no
job; an honest host passes its probe and does; a GPU or driver change asks again."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import nats.errors
import pytest
from gpuplane.v1 import admin_pb2, registry_pb2, registry_pb2_grpc, types_pb2

from controlplane.verification import challenge
from devstack.factories import GIB, bearer, new_host, new_key
from tests.controlplane.scripted_host import ScriptedHost
from tests.harness import JobPlane
from tests.reliability import summary

S = types_pb2
H100 = "NVIDIA H100 80GB HBM3"
# A plane where jobs go only to verified hosts (the production default) and providers may
# mint their own tokens (the attacker did).
pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.plane(
        allow_unverified_by_default=False,
        self_service_providers=True,
        heartbeat_timeout_ms=60_000,
    ),
]


class ClaimingHost(ScriptedHost):
    """A daemon played by the test that registers non-simulated GPUs of `model` with the NVML
    facts it chooses, and answers probes as the test says."""

    def __init__(self, *args: Any, vram_gib: int = 80, cc: str = "9.0", **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.vram_gib = vram_gib
        self.cc = cc
        self.driver = "550.54.15"

    def gpus(self) -> list[types_pb2.Gpu]:
        return [
            types_pb2.Gpu(
                uuid=f"GPU-{self.machine_id[:8]}-{i}",
                index=i,
                name=self.model,
                memory_total_bytes=self.vram_gib * GIB - 400 * 1024**2,
                compute_capability=self.cc,
                power_limit_milliwatts=700_000,
            )
            for i in range(self.gpu_count)
        ]

    async def register(self) -> registry_pb2.RegisterHostResponse:
        reply = await new_host(
            self.channel,
            self.token,
            machine_id=self.machine_id,
            gpus=self.gpus(),
            simulated=False,
            driver_version=self.driver,
            price_per_gpu_hour_micro_credits=self.price,
        )
        self.host_id, self.credential = reply.host_id, reply.host_credential
        return reply

    async def probe(self, timeout: float = 10.0) -> registry_pb2.ProbeCommand:
        while True:
            message = await asyncio.wait_for(self.commands.get(), timeout)
            if message.WhichOneof("msg") == "probe":
                return message.probe

    async def answer(self, probe: registry_pb2.ProbeCommand, products: list[bytes]) -> None:
        for index, product in enumerate(products):
            answer = registry_pb2.ProbeAnswer(probe_id=probe.probe_id, index=index, product=product)
            await self._write(registry_pb2.DaemonMessage(probe_answer=answer))


def honest(probe: registry_pb2.ProbeCommand) -> list[bytes]:
    """What a genuine GPU computes (here in Python: n is tiny in tests)."""
    return [challenge.encode(challenge.product(s, probe.n, probe.rounds)) for s in probe.seeds]


def forged(probe: registry_pb2.ProbeCommand) -> list[bytes]:
    """A plausible-looking product that was never computed: right size, entries in range."""
    rng = random.Random(7)
    top = probe.n * probe.rounds * 49
    return [
        challenge.encode([rng.randrange(top) for _ in range(probe.n * probe.n)])
        for _ in probe.seeds
    ]


async def self_minted(plane: JobPlane) -> str:
    """A registration token the provider minted for itself (self-service onboarding)."""
    provider_key = await new_key(plane, plane.provider_tenant, S.ROLE_PROVIDER)
    request = admin_pb2.CreateRegistrationTokenRequest(provider_tenant_id=plane.provider_tenant)
    reply = await plane.admin.CreateRegistrationToken(request, metadata=bearer(provider_key))
    return reply.secret


async def claiming(plane: JobPlane, token: str, **kw: Any) -> ClaimingHost:
    host = ClaimingHost(plane.channel, plane.nats_url, token, model=H100, gpus=2, **kw)
    await host.start()
    return host


async def host_of(plane: JobPlane, host_id: str) -> types_pb2.Host:
    stub = registry_pb2_grpc.RegistryServiceStub(plane.channel)
    reply = await stub.GetHost(registry_pb2.GetHostRequest(host_id=host_id), metadata=plane.auth())
    return reply.host


async def until_host(plane: JobPlane, host_id: str, test: Any, timeout: float = 10.0) -> Any:
    async with asyncio.timeout(timeout):
        while not test(host := await host_of(plane, host_id)):
            await asyncio.sleep(0.05)
    return host


async def gets_no_job(host: ClaimingHost, seconds: float = 1.5) -> None:
    with pytest.raises(nats.errors.TimeoutError):
        await host.next_dispatch(timeout=seconds)


async def offered(plane: JobPlane) -> dict[str, bool]:
    stub = registry_pb2_grpc.RegistryServiceStub(plane.channel)
    reply = await stub.ListOffers(
        registry_pb2.ListOffersRequest(), metadata=plane.auth(plane.consumer_key)
    )
    return {o.host_id: o.verified for o in reply.offers}


@pytest.mark.databases("sqlite", "postgresql")
async def test_a_fake_gpu_host_stays_unverified_and_gets_no_job(plane: JobPlane) -> None:
    # The attacker: two invented H100s, simulated:false, a self-minted token.
    fake = await claiming(plane, await self_minted(plane))
    try:
        probe = await fake.probe()
        assert (len(probe.seeds), probe.n, probe.rounds) == (2, 16, 2)
        assert probe.image
        assert probe.deadline_ms > 0
        await fake.answer(probe, forged(probe))
        host = await until_host(plane, fake.host_id, lambda h: "wrong" in h.verification_reason)
        assert not host.verified
        assert "GPU 0: row" in host.verification_reason
        # Self-service: admitted (ONLINE, offered) only once verified, whatever a job allows.
        assert host.state == S.HOST_STATE_REGISTERED
        assert fake.host_id not in await offered(plane)
        jobs = [
            await plane.submit(gpu_count=1),
            await plane.submit(gpu_count=1, allow_unverified=True),
        ]
        await gets_no_job(fake)
        for job in jobs:
            assert (await plane.get(job.job_id)).state == S.JOB_STATE_QUEUED
        # Answering the failed probe again, rightly this time, changes nothing.
        await fake.answer(probe, honest(probe))
        await asyncio.sleep(0.3)
        assert not (await host_of(plane, fake.host_id)).verified
        # Reconnecting buys no fresh try before GPUPLANE_PROBE_RETRY_SECONDS (checks cost).
        await hello_again(fake)
        with pytest.raises(TimeoutError):
            await fake.probe(timeout=0.5)
    finally:
        await fake.close()
    summary.record(
        "a fake GPU host",
        "2 invented H100s, self-minted token, forged product: unverified, REGISTERED, 0 of 2 jobs",
        faults_injected=1,
        requests_tried=2,
    )


async def test_nvml_facts_no_h100_has_keep_a_host_unverified(plane: JobPlane) -> None:
    liar = await claiming(plane, await plane.token(), vram_gib=24)
    try:
        host = await until_host(plane, liar.host_id, lambda h: "GiB" in h.verification_reason)
        assert "a H100 has 80/94 GiB" in host.verification_reason
        assert not host.verified
        # An admin's token: online, offered as unverified, and no probe was worth sending.
        assert host.state == S.HOST_STATE_ONLINE
        assert (await offered(plane)).get(liar.host_id) is False
        with pytest.raises(TimeoutError):
            await liar.probe(timeout=0.5)
        job = await plane.submit(gpu_count=1)
        await gets_no_job(liar)
        queued = await plane.get(job.job_id)
        assert queued.state == S.JOB_STATE_QUEUED
        assert "has not passed hardware verification" in queued.state_reason
        # A consumer who opts out (--allow-unverified) may use it.
        opted = await plane.submit(gpu_count=1, allow_unverified=True)
        assert (await liar.next_dispatch()).job_id == opted.job_id
    finally:
        await liar.close()
    summary.record(
        "a host whose NVML facts fit no H100",
        "24 GiB 'H100': unverified without a probe; only the job that allowed it ran there",
        faults_injected=1,
        jobs_run=1,
    )


async def test_an_honest_host_passes_and_a_driver_change_asks_again(plane: JobPlane) -> None:
    good = await claiming(plane, await self_minted(plane))
    try:
        probe = await good.probe()
        await good.answer(probe, honest(probe))
        host = await until_host(plane, good.host_id, lambda h: h.verified)
        assert host.state == S.HOST_STATE_ONLINE
        assert host.verification_reason == ""
        assert (await offered(plane)).get(good.host_id) is True
        job = await plane.submit(gpu_count=1)
        assert (await good.next_dispatch()).job_id == job.job_id
        # The daemon comes back with another driver: unverified at once, probed again.
        await good.stop_heartbeats()
        await good._nc.close()
        good.driver = "560.35.03"
        await good.register()
        assert not (await host_of(plane, good.host_id)).verified
        await good.start()
        again = await good.probe()
        assert again.probe_id != probe.probe_id
        host = await host_of(plane, good.host_id)
        assert "changed" in host.verification_reason
        await good.answer(again, honest(again))
        await until_host(plane, good.host_id, lambda h: h.verified)
    finally:
        await good.close()
    summary.record(
        "an honest host, then a driver change",
        "verified, took its job; unverified on the change until a second probe passed",
        jobs_run=1,
    )


@pytest.mark.plane(
    allow_unverified_by_default=False,
    self_service_providers=True,
    heartbeat_timeout_ms=60_000,
    probe_allowance_ms=0,
)
async def test_a_late_or_missing_answer_keeps_a_host_unverified(plane: JobPlane) -> None:
    late = await claiming(plane, await self_minted(plane))
    silent = await claiming(plane, await self_minted(plane))
    try:
        probe = await late.probe()
        assert probe.deadline_ms <= 5  # a real H100 needs microseconds for this product
        # Past the deadline and past a liveness tick (1 s): the sweep waits NO_ANSWER_GRACE
        # for an answer on its way, so this one is judged, and called late.
        await asyncio.sleep(1.2)
        await late.answer(probe, honest(probe))
        host = await until_host(plane, late.host_id, lambda h: "late" in h.verification_reason)
        assert not host.verified
        assert host.state == S.HOST_STATE_REGISTERED
        await silent.probe()
        host = await until_host(
            plane, silent.host_id, lambda h: "no answer" in h.verification_reason
        )
        assert "0 of 2 GPUs answered" in host.verification_reason
        await plane.submit(gpu_count=1, allow_unverified=True)
        await gets_no_job(late)
        await gets_no_job(silent, 0.5)
    finally:
        await late.close()
        await silent.close()
    summary.record(
        "a late and a missing probe answer",
        "right product after its deadline, and none: both unverified, 0 jobs",
        faults_injected=2,
        requests_tried=1,
    )


@pytest.mark.plane(
    allow_unverified_by_default=False,
    self_service_providers=True,
    heartbeat_timeout_ms=2_000,
    probe_reverify_seconds=1,
    probe_retry_seconds=1,
)
async def test_hosts_are_probed_again_periodically_and_a_failed_re_probe_unverifies(
    plane: JobPlane,
) -> None:
    host = await claiming(plane, await self_minted(plane))
    try:
        first = await host.probe()
        await host.answer(first, honest(first))
        await until_host(plane, host.host_id, lambda h: h.verified)
        # Probed again while connected (GPUPLANE_PROBE_REVERIFY_SECONDS); verified meanwhile.
        second = await host.probe()
        assert second.probe_id > first.probe_id
        assert (await host_of(plane, host.host_id)).verified
        # The same hardware now answers wrong: unverified; still ONLINE, offered as such.
        await host.answer(second, forged(second))
        shown = await until_host(plane, host.host_id, lambda h: not h.verified)
        assert f"probe {second.probe_id}: GPU 0: row" in shown.verification_reason
        assert shown.state == S.HOST_STATE_ONLINE
        assert (await offered(plane)).get(host.host_id) is False
        # Self-service: unverified, it takes no job even from a job that allows unverified.
        await plane.submit(gpu_count=1, allow_unverified=True)
        await gets_no_job(host, 1.0)
        # And asked again after GPUPLANE_PROBE_RETRY_SECONDS: a right answer restores it.
        third = await host.probe()
        await host.answer(third, honest(third))
        await until_host(plane, host.host_id, lambda h: h.verified)
        await host.next_dispatch()  # verified again: the waiting job comes
    finally:
        await host.close()
    summary.record(
        "periodic re-verification",
        "re-probed while verified; a wrong re-probe unverified it (no job, even one allowing "
        "unverified: self-service), the retry restored it and the job came",
        faults_injected=1,
        jobs_run=1,
    )


async def hello_again(host: ClaimingHost, **fields: Any) -> None:
    """The daemon's stream breaks and it connects again, saying `fields` in its hello."""
    await host.stop_heartbeats()
    stub = registry_pb2_grpc.RegistryServiceStub(host.channel)
    call = stub.Connect(metadata=bearer(host.credential))  # type: ignore[call-arg]
    hello = registry_pb2.DaemonHello(host_id=host.host_id, **fields)
    await call.write(registry_pb2.DaemonMessage(hello=hello))
    first = await call.read()
    assert isinstance(first, registry_pb2.ControlMessage)
    assert first.WhichOneof("msg") == "hello_ack"
    host._call = call
    host._tasks = [asyncio.create_task(host._read_commands())]


async def test_a_driver_or_gpu_change_said_in_hello_unverifies_the_host(plane: JobPlane) -> None:
    host = await claiming(plane, await plane.token())
    try:
        probe = await host.probe()
        await host.answer(probe, honest(probe))
        await until_host(plane, host.host_id, lambda h: h.verified)
        # Restarted under another driver, not registered again: unverified, probed again.
        await hello_again(host, gpus=host.gpus(), driver_version="560.35.03")
        shown = await until_host(plane, host.host_id, lambda h: not h.verified)
        assert shown.verification_reason == "its GPUs or driver changed"
        assert shown.driver_version == "560.35.03"
        again = await host.probe()
        await host.answer(again, honest(again))
        await until_host(plane, host.host_id, lambda h: h.verified)
        # A GPU it never registered: unverified until it registers again, and not probed.
        swapped = host.gpus()
        swapped[1].uuid = "GPU-swapped-1"
        await hello_again(host, gpus=swapped, driver_version="560.35.03")
        shown = await until_host(plane, host.host_id, lambda h: not h.verified)
        assert "GPU-swapped-1" in shown.verification_reason
        with pytest.raises(TimeoutError):
            await host.probe(timeout=0.5)
    finally:
        await host.close()
    summary.record(
        "a driver or GPU change at restart",
        "new driver in hello: unverified and re-probed; an unregistered GPU: unverified",
        faults_injected=2,
    )
