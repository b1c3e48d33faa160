"""Hardware verification: challenges a host's GPUs and marks it verified when they answer."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Sequence
from datetime import datetime, timedelta

from gpuplane.v1 import registry_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.commands.repository import CommandRepository
from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.registry.models import Gpu, Host
from controlplane.registry.repository import RegistryRepository
from controlplane.registry.states import HostState, hello_state, set_host_state, set_verification
from controlplane.registry.streams import HostStreams
from controlplane.verification import challenge
from controlplane.verification.gpu_table import lookup, mismatch
from controlplane.verification.models import HostProbe
from controlplane.verification.repository import ProbeRepository
from controlplane.verification.settings import VerificationSettings

log = logging.getLogger(__name__)
PASSED = "passed"
FAILED = "failed"
SIMULATED = "simulated GPUs are never verified"
# How often connected hosts are looked at for a periodic probe, at most, in seconds.
REPROBE_LOOK_SECONDS = 30.0
# The sweep fails an unanswered probe only this long after its deadline: an answer already
# on its way is judged on its own arrival time ("late: … answered N ms after"), which tells
# the provider more than "no answer", and the outcome (failed) is the same.
NO_ANSWER_GRACE = timedelta(seconds=2)


def fingerprint(host: Host, gpus: Sequence[Gpu]) -> str:
    """What a passed probe vouches for: the driver and the healthy GPUs, as registered."""
    parts = [host.driver_version, host.cuda_driver_version]
    for gpu in sorted(gpus, key=lambda g: g.uuid):
        if gpu.healthy:
            parts += [gpu.uuid, gpu.name, str(gpu.memory_total_bytes), gpu.compute_capability]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


class VerificationService:
    """Sends a probe (a ProbeCommand, stored and delivered like any command) to a host whose
    daemon says hello unless it is verified for its current GPUs and driver, again every
    `reverify_seconds` (`retry_seconds` after a failure) while it is connected, and checks
    the answers (challenge.check, off the event loop). A probe not fully answered by its
    deadline fails; a failure leaves the host unverified with the reason."""

    def __init__(self, db: Database, settings: VerificationSettings, streams: HostStreams) -> None:
        self.db = db
        self.settings = settings
        self.streams = streams
        self.rng = random.SystemRandom()
        # The latest answer checks' durations, in seconds (bench and metrics read them).
        self.check_seconds: list[float] = []
        self._next_look = 0.0

    async def hello(
        self,
        host_id: str,
        hello: registry_pb2.DaemonHello | None = None,
        known: Host | None = None,
    ) -> None:
        """The host's daemon said hello: probe it unless it is verified as it is now (the
        driver and GPUs its hello reports, when it reports them, are what it registered). A
        simulated host already marked never-verified costs one read: hello storms of
        simulated fleets (tests, benchmarks) take no writer lock here; none at all when the
        caller passes the host as `known` (read as the hello was recorded)."""
        if known is None:
            async with self.db.read() as session:
                known = await RegistryRepository(session).get_host(host_id)
        reported = "" if hello is None else hello.driver_version[:64]
        if known is None or (
            known.simulated
            and known.verification_reason == SIMULATED
            and reported in ("", known.driver_version)
        ):
            return
        async with self.db.transaction() as session:
            registry = RegistryRepository(session)
            host = await registry.get_host(host_id, lock=True)
            if host is None:
                return
            if hello is not None and hello.driver_version:
                host.driver_version = hello.driver_version[:64]
                host.cuda_driver_version = hello.cuda_driver_version[:64]
            changed = await _gpus_changed(registry, host, hello)
            if changed and not host.simulated:
                set_verification(registry, host, None, changed, utcnow())
                return
            # Reconnecting does not buy a fresh probe sooner than the retry interval: each
            # answer costs the control plane a check.
            latest = await ProbeRepository(session).latest_of(host_id)
            retry = timedelta(seconds=self.settings.retry_seconds)
            waiting = (
                latest is not None
                and latest.outcome == FAILED
                and (latest.answered_at is None or utcnow() - latest.answered_at < retry)
            )
            issued = await self._probe(session, host, due=host.verified_at is None and not waiting)
        if issued:
            self.streams.wake(host_id)

    async def _probe(self, session: AsyncSession, host: Host, *, due: bool) -> bool:
        """Checks the host's NVML facts against the model table and stores a probe for it if
        they fit and one is `due` (or its GPUs changed); True when one was stored."""
        registry = RegistryRepository(session)
        probes = ProbeRepository(session)
        now = utcnow()
        if host.simulated:
            set_verification(registry, host, None, SIMULATED, now)
            return False
        gpus = sorted((g for g in await registry.gpus_of([host.id]) if g.healthy), key=_index)
        current = fingerprint(host, gpus)
        if host.verified_at is not None and host.verified_fingerprint != current:
            set_verification(registry, host, None, "its GPUs or driver changed", now)
            due = True
        reason = _facts_mismatch(gpus)
        pending = await probes.pending_of(host.id)
        if reason:
            set_verification(registry, host, None, reason, now)
        if reason or not due:
            return False
        if any(p.fingerprint == current for p in pending):
            return False  # one is on its way (its command is re-sent until acknowledged)
        for stale in pending:
            _end(stale, FAILED, "superseded: the host's GPUs or driver changed", now)
        probe = self._new_probe(host, gpus, current, now)
        probes.add(probe)
        await probes.flush()
        command = registry_pb2.ProbeCommand(
            probe_id=probe.id,
            image=self.settings.image,
            n=probe.n,
            rounds=probe.rounds,
            seeds=_split(probe.seeds),
            deadline_ms=int((probe.deadline_at - now).total_seconds() * 1000),
            gpu_uuids=probe.gpu_uuids,
        )
        message = registry_pb2.ControlMessage(probe=command)
        await CommandRepository(session).issue(host.id, message, now)
        return True

    def _new_probe(self, host: Host, gpus: Sequence[Gpu], current: str, now: datetime) -> HostProbe:
        s = self.settings
        deadline = max(
            challenge.deadline_ms(model, s.n, s.rounds, s.allowance_ms, s.slack)
            for model in (lookup(g.name) for g in gpus)
            if model is not None
        )
        made = challenge.new_challenge(len(gpus), s.n, s.rounds, deadline)
        return HostProbe(
            host_id=host.id,
            n=made.n,
            rounds=made.rounds,
            seeds=b"".join(made.seeds),
            gpu_uuids=[g.uuid for g in gpus],
            fingerprint=current,
            issued_at=now,
            deadline_at=now + timedelta(milliseconds=deadline),
            passed=[],
            reason="",
            check_us=0,
        )

    async def answer(self, host_id: str, answer: registry_pb2.ProbeAnswer) -> None:
        """One GPU's answer to one of the host's probes (others' and finished ones are
        ignored): a wrong, late or failed answer fails the probe; the last right one passes
        it, and a self-service host waiting REGISTERED is admitted."""
        received = utcnow()
        async with self.db.read() as session:
            probe = await ProbeRepository(session).get(answer.probe_id, host_id)
            gpus = {g.uuid: g for g in await RegistryRepository(session).gpus_of([host_id])}
        if probe is None or probe.outcome is not None or answer.index in probe.passed:
            log.info("host %s: answer to probe %d ignored (unknown, finished or repeated)",
                     host_id, answer.probe_id)  # fmt: skip
            return
        verdict, spent = await self._judge(probe, answer, received, gpus)
        async with self.db.transaction() as session:
            probe = await ProbeRepository(session).get(answer.probe_id, host_id, lock=True)
            if probe is None or probe.outcome is not None:
                return
            probe.check_us += int(spent * 1e6)
            registry = RegistryRepository(session)
            host = await registry.get_host(host_id, lock=True)
            assert host is not None
            if verdict:
                _end(probe, FAILED, verdict, received)
                set_verification(registry, host, None, f"probe {probe.id}: {verdict}", received)
                return
            probe.passed = sorted({*probe.passed, answer.index})
            if len(probe.passed) == len(probe.gpu_uuids):
                await self._passed(registry, host, probe, received)

    async def _passed(
        self, registry: RegistryRepository, host: Host, probe: HostProbe, now: datetime
    ) -> None:
        _end(probe, PASSED, "", now)
        if fingerprint(host, await registry.gpus_of([host.id])) != probe.fingerprint:
            set_verification(registry, host, None, "its GPUs or driver changed meanwhile", now)
            return
        took = (now - probe.issued_at).total_seconds() * 1000
        why = (
            f"probe {probe.id} passed: {len(probe.gpu_uuids)} GPU(s), {probe.n}×{probe.n} × "
            f"{probe.rounds} in {took:.0f} ms"
        )
        set_verification(registry, host, probe.fingerprint, why, now)
        if host.state == HostState.REGISTERED.value:
            admitted = hello_state(host)
            if admitted is not None:
                set_host_state(registry, host, admitted, "passed its verification probe", now)

    async def _judge(
        self,
        probe: HostProbe,
        answer: registry_pb2.ProbeAnswer,
        received: datetime,
        gpus: dict[str, Gpu],
    ) -> tuple[str, float]:
        """Why the answer fails ("" when it is right) and how long checking it took."""
        limit_ms = (probe.deadline_at - probe.issued_at).total_seconds() * 1000
        if answer.error:
            return f"the probe could not run on the host: {answer.error[:300]}", 0.0
        if received > probe.deadline_at:
            took = (received - probe.issued_at).total_seconds() * 1000
            return (
                f"late: GPU {answer.index} answered {took:.0f} ms after the challenge, "
                f"past its deadline of {limit_ms:.0f} ms",
                0.0,
            )
        if answer.index >= len(probe.gpu_uuids):
            return f"an answer for GPU {answer.index}, which was not challenged", 0.0
        seen = _seen_mismatch(answer, gpus.get(probe.gpu_uuids[answer.index]))
        if seen:
            return seen, 0.0
        seed = _split(probe.seeds)[answer.index]
        rng = random.Random(self.rng.getrandbits(64))
        start = time.perf_counter()
        try:
            await asyncio.to_thread(
                challenge.check, seed, probe.n, probe.rounds, answer.product, rng
            )
        except challenge.BadAnswer as error:
            return f"GPU {answer.index}: {error}", time.perf_counter() - start
        spent = time.perf_counter() - start
        self.check_seconds = [*self.check_seconds[-99:], spent]
        return "", spent

    async def sweep(self) -> None:
        """Periodic: fails the probes `NO_ANSWER_GRACE` past their deadline; probes connected
        hosts again whose last probe passed `reverify_seconds` ago (failed: `retry_seconds`)."""
        now = utcnow()
        async with self.db.transaction() as session:
            registry = RegistryRepository(session)
            for probe in await ProbeRepository(session).overdue(now - NO_ANSWER_GRACE):
                limit_ms = (probe.deadline_at - probe.issued_at).total_seconds() * 1000
                why = (
                    f"no answer within its deadline of {limit_ms:.0f} ms "
                    f"({len(probe.passed)} of {len(probe.gpu_uuids)} GPUs answered)"
                )
                _end(probe, FAILED, why, now)
                host = await registry.get_host(probe.host_id, lock=True)
                if host is not None:
                    set_verification(registry, host, None, f"probe {probe.id}: {why}", now)
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_look:
            return
        self._next_look = loop.time() + min(
            REPROBE_LOOK_SECONDS, self.settings.retry_seconds, self.settings.reverify_seconds
        )
        async with self.db.read() as session:
            rows = await ProbeRepository(session).connected_hosts_last_probed()
        for host_id, issued, outcome in rows:
            if issued is None or outcome is None:
                continue
            wait = (
                self.settings.reverify_seconds if outcome == PASSED else self.settings.retry_seconds
            )
            if (now - issued).total_seconds() >= wait:
                async with self.db.transaction() as session:
                    host = await RegistryRepository(session).get_host(host_id, lock=True)
                    issued_now = host is not None and await self._probe(session, host, due=True)
                if issued_now:
                    self.streams.wake(host_id)


async def _gpus_changed(
    registry: RegistryRepository, host: Host, hello: registry_pb2.DaemonHello | None
) -> str:
    """Why the GPUs the hello reports are not those registered ("" when they are, or when
    it reports none)."""
    if hello is None or not hello.gpus:
        return ""
    said = {(g.uuid, g.name, g.memory_total_bytes, g.compute_capability) for g in hello.gpus}
    rows = await registry.gpus_of([host.id])
    known = {(g.uuid, g.name, g.memory_total_bytes, g.compute_capability) for g in rows}
    if said <= known:
        return ""
    new = sorted(uuid for uuid, *_ in said - known)
    return f"its daemon reports GPUs it did not register ({', '.join(new)[:200]}): register again"


def _index(gpu: Gpu) -> int:
    return gpu.index


def _split(seeds: bytes) -> list[bytes]:
    size = challenge.SEED_BYTES
    return [seeds[i : i + size] for i in range(0, len(seeds), size)]


def _end(probe: HostProbe, outcome: str, reason: str, now: datetime) -> None:
    probe.outcome = outcome
    probe.reason = reason[:500]
    probe.answered_at = now


def _facts_mismatch(gpus: Sequence[Gpu]) -> str:
    """Why the registered NVML facts cannot be the models they claim ("" when they can)."""
    if not gpus:
        return "no healthy GPU to verify"
    for gpu in gpus:
        reason = mismatch(
            gpu.name, gpu.memory_total_bytes, gpu.compute_capability, gpu.power_limit_milliwatts
        )
        if reason:
            return f"GPU {gpu.index}: {reason}"
    return ""


def _seen_mismatch(answer: registry_pb2.ProbeAnswer, registered: Gpu | None) -> str:
    """Whether what the probe container saw contradicts what the host registered."""
    if registered is None:
        return f"GPU {answer.index} is no longer registered"
    if not answer.HasField("gpu"):
        return ""
    seen = answer.gpu
    if seen.name and seen.name != registered.name:
        return (
            f"GPU {answer.index}: the probe saw {seen.name!r}, the host claims {registered.name!r}"
        )
    total = registered.memory_total_bytes
    if seen.memory_total_bytes and abs(seen.memory_total_bytes - total) > total * 0.02:
        return (
            f"GPU {answer.index}: the probe saw {seen.memory_total_bytes} bytes of memory, "
            f"the host claims {total}"
        )
    return ""
