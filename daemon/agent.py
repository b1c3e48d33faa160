"""The provider daemon: identity, Connect stream, dispatch consumer, one executor per attempt."""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

import docker
import grpc
import urllib3
from docker.models.containers import Container
from google.protobuf.message import DecodeError
from gpuplane.v1 import messaging_pb2, registry_pb2
from nats.aio.msg import Msg

from daemon import commands, reattach
from daemon.attribution import JobAttribution
from daemon.bus import DaemonBus, connect_bus
from daemon.channel import open_channel
from daemon.connect import ConnectClient
from daemon.exec_io import hang_up_left_execs
from daemon.executor import JobExecutor
from daemon.gpus import GpuInventory, discover
from daemon.identity import (
    HostIdentity,
    RegistrationError,
    apply_offer,
    daemon_version,
    load_identity,
    register,
    required_token,
    until_answered,
)
from daemon.journal import Journal, JournalEntry
from daemon.metrics import DaemonMetrics
from daemon.nvml import NvmlSampler
from daemon.probe import run_probe
from daemon.progress import Progress
from daemon.provenance import HostFacts
from daemon.runtime import DockerRuntime
from daemon.scrub import Scrubber, mark_quarantined, recheck_forever, scrubber_for
from daemon.settings import DaemonSettings
from daemon.telemetry import DEFAULT_INTERVAL_MS, Sampler, SimulatedSampler, TelemetryLoop
from daemon.tunnels import Tunnels
from daemon.watchers import AttemptWatchers
from messaging.subjects import DISPATCH_STREAM, dispatch_durable, dispatch_subject
from messaging.tasks import SLOW_STEP_SECONDS, stop_tasks, timed
from storage.scoped import GrantedStore, grant_http_pool

log = logging.getLogger(__name__)
Key = tuple[str, int]
Kind = messaging_pb2.JobReportKind
StopReason = messaging_pb2.StopReason
# Attempts that ended here recently: a redelivered dispatch for one of them is acked, not run.
_REMEMBERED_ATTEMPTS = 4096


class Agent:
    """Everything one daemon process runs. start() → run_forever() → stop()."""

    def __init__(self, settings: DaemonSettings) -> None:
        self.settings = settings
        self.inventory: GpuInventory | None = None
        self.identity: HostIdentity | None = None
        self.journal = Journal(settings.journal_dir)
        self.executors: dict[Key, JobExecutor] = {}
        self.watchers = AttemptWatchers(
            lambda: self._runtime, lambda m: self.connect is not None and self.connect.send(m)
        )
        self.deadlines = self.watchers.deadlines  # of sessions and replicas, for commands
        self.draining = False
        self.drain_reason = ""
        # Attempts journaled by an earlier run of this daemon, not yet adopted or settled.
        self.leftovers: dict[Key, JournalEntry] = {}
        self.reattached: list[Key] = []
        self.orphans_removed = 0
        # Execs an earlier run left running in containers this run adopted, ended.
        self.left_execs_ended = 0
        self.telemetry: TelemetryLoop | None = None
        self._reconciling = asyncio.Lock()
        self._ended: OrderedDict[Key, None] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        # Why this daemon gave up (its host revoked): run_forever() returns; the CLI says it.
        self.fatal = ""
        self._channel: grpc.aio.Channel | None = None
        self._bus: DaemonBus | None = None
        self._runtime: DockerRuntime | None = None
        self._http: urllib3.PoolManager | None = None
        self.connect: ConnectClient | None = None
        self.scrubber: Scrubber | None = None
        self.tunnels = Tunnels(self)  # exec and port-forward (daemon/tunnels.py)
        # Set before start() when the daemon serves /metrics (daemon/metrics.py).
        self.metrics: DaemonMetrics | None = None

    @property
    def host_id(self) -> str:
        return self.identity.host_id if self.identity else ""

    async def start(self) -> None:
        """Discovers GPUs, registers (once), connects to Docker, NATS and the control plane,
        settles attempts left by an earlier run, then starts taking dispatches."""
        settings = self.settings
        self.inventory = await asyncio.to_thread(discover, settings)
        self._channel = open_channel(settings.control_plane, settings.channel_security())
        self.identity = load_identity(settings)
        if self.identity is None:
            required_token(settings)  # no token: say so before anything else
        # The engine must answer before a registration token is spent (DockerException).
        client = await asyncio.to_thread(self._docker_client)
        await asyncio.to_thread(client.ping)
        if self.identity is None:
            self.identity = await until_answered(self.settings, self._register)
        else:
            await until_answered(self.settings, self._apply_offer)
        identity = self.identity
        self._runtime = DockerRuntime(
            client,
            settings,
            host_id=identity.host_id,
            simulated_gpus=self.inventory.simulated,
            gpu_count=len(self.inventory.gpus),
        )
        self._http = grant_http_pool()
        self._bus = await connect_bus(settings, identity)
        self._bus.on_report_published = self.metrics.observe_report if self.metrics else None
        self.leftovers = {(e.job_id, e.attempt): e for e in self.journal.entries()}
        journaled = (e.dispatch_b64 for e in self.leftovers.values())
        self.scrubber = await scrubber_for(settings, self.inventory, journaled)
        self._spawn(recheck_forever(self.scrubber, settings.scrub_recheck_seconds))
        await self._settle_vanished(await self._runtime.find_by_label(host=identity.host_id))
        await self._bus.subscribe(
            identity.dispatch_subject or dispatch_subject(identity.host_id),
            identity.dispatch_stream or DISPATCH_STREAM,
            identity.dispatch_durable or dispatch_durable(identity.host_id),
        )
        self.connect = self._connect_client(identity)
        self.telemetry = TelemetryLoop(
            self._sampler(), self._send_telemetry, self._telemetry_interval, self._busy
        )
        self._spawn(self.connect.run())
        self._spawn(self.telemetry.run())
        self._spawn(self._bus.take_dispatches(self._on_dispatch, self._may_take))
        log.info(
            "daemon up: host %s, %d %sGPUs",
            identity.host_id,
            len(self.inventory.gpus),
            "simulated " if self.inventory.simulated else "",
        )

    def _connect_client(self, identity: HostIdentity) -> ConnectClient:
        assert self._channel is not None
        assert self.inventory is not None
        settings = self.settings
        return ConnectClient(
            self._channel,
            host_id=identity.host_id,
            credential=identity.host_credential,
            daemon_version=daemon_version(),
            gpus=list(self.inventory.gpus),
            running_jobs=self.running_jobs,
            on_command=self.on_command,
            on_unauthenticated=self._reregister,
            heartbeat_interval_ms=identity.heartbeat_interval_ms or settings.heartbeat_interval_ms,
            telemetry_interval_ms=identity.telemetry_interval_ms or DEFAULT_INTERVAL_MS,
            backoff_base_seconds=settings.reconnect_base_seconds,
            backoff_max_seconds=settings.reconnect_max_seconds,
            driver_versions=(self.inventory.driver_version, self.inventory.cuda_driver_version),
        )

    async def run_forever(self) -> None:
        await self._stopped.wait()

    async def run(self) -> None:
        """start(), then run until cancelled or stop(); stops on the way out."""
        try:
            await self.start()
            await self.run_forever()
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stops taking work and leaves running containers as they are (their journal entries
        stay, for the next start to settle)."""
        self._stopped.set()
        # A step slower than SLOW_STEP_SECONDS is logged with its time.
        with timed(log, "daemon stop: its tasks", warn_after=SLOW_STEP_SECONDS):
            await stop_tasks(list(self._tasks))
        with timed(log, "daemon stop: its tunnels", warn_after=SLOW_STEP_SECONDS):
            await self.tunnels.close()
        if self._bus is not None:
            with timed(log, "daemon stop: its NATS connection", warn_after=SLOW_STEP_SECONDS):
                await self._bus.close()
        if self._channel is not None:
            with timed(log, "daemon stop: its gRPC channel", warn_after=SLOW_STEP_SECONDS):
                await self._channel.close(grace=None)
        if self._runtime is not None:
            with timed(log, "daemon stop: its Docker client", warn_after=SLOW_STEP_SECONDS):
                self._runtime.close()
                await asyncio.to_thread(self._runtime.client.close)

    def running_jobs(self) -> list[registry_pb2.RunningJob]:
        """Live executors, and leftovers of an earlier run still waiting to be adopted."""
        running = [
            registry_pb2.RunningJob(
                job_id=job_id, attempt=attempt, state=executor.progress.job_state
            )
            for (job_id, attempt), executor in self.executors.items()
        ]
        running.extend(
            registry_pb2.RunningJob(
                job_id=job_id,
                attempt=attempt,
                state=entry.state.job_state,
            )
            for (job_id, attempt), entry in self.leftovers.items()
        )
        return running

    # ---- telemetry ---------------------------------------------------------------------

    def _sampler(self) -> Sampler:
        assert self.inventory is not None
        assert self._runtime is not None
        if self.inventory.simulated:
            return SimulatedSampler(list(self.inventory.gpus))
        attribution = JobAttribution(self._runtime.job_containers)
        return NvmlSampler([g.uuid for g in self.inventory.gpus], attribution.job_of)

    def _send_telemetry(self, batch: registry_pb2.TelemetryBatch) -> bool:
        assert self.connect is not None
        quarantined = self.scrubber.quarantined if self.scrubber else {}
        return self.connect.send_telemetry(mark_quarantined(batch, quarantined))

    def _telemetry_interval(self) -> int:
        if self.settings.telemetry_interval_ms:
            return self.settings.telemetry_interval_ms
        return self.connect.telemetry_interval_ms if self.connect else DEFAULT_INTERVAL_MS

    def _busy(self) -> dict[str, str]:
        """GPU UUID → job id of the attempts whose containers run now."""
        return {
            uuid: executor.job_id
            for executor in self.executors.values()
            if executor.progress is Progress.RUNNING
            for uuid in executor.dispatch.gpu_uuids
        }

    # ---- dispatches --------------------------------------------------------------------

    def _may_take(self) -> bool:
        return len(self.executors) < self.settings.max_concurrent_jobs

    async def _on_dispatch(self, message: Msg) -> None:
        try:
            dispatch = messaging_pb2.DispatchMessage.FromString(message.data)
        except DecodeError:
            log.error("undecodable dispatch on %s terminated", message.subject)
            await message.term()
            return
        if not dispatch.job_id or not dispatch.attempt:
            log.error("dispatch without job id or attempt terminated")
            await message.term()
            return
        key = (dispatch.job_id, dispatch.attempt)
        if key in self.executors or key in self._ended or self.journal.get(*key):
            log.info("dispatch %s/%s delivered again: already taken", *key)
            await message.ack()
            return
        assert self.inventory is not None
        missing = self.inventory.missing(list(dispatch.gpu_uuids))
        encoded = base64.b64encode(message.data).decode()
        await asyncio.to_thread(self.journal.write, JournalEntry(*key, dispatch_b64=encoded))
        await message.ack()
        if missing:
            await self._report_once(
                dispatch,
                Kind.JOB_REPORT_KIND_FAILED_TO_START,
                StopReason.STOP_REASON_GPUS_MISSING,
                f"this host has no GPU {', '.join(missing)}",
            )
            return
        blocked = self.scrubber.blocked(dispatch.gpu_uuids) if self.scrubber else {}
        if blocked:
            why = "; ".join(f"GPU {uuid} is quarantined: {text}" for uuid, text in blocked.items())
            await self._report_once(
                dispatch,
                Kind.JOB_REPORT_KIND_FAILED_TO_START,
                StopReason.STOP_REASON_GPU_QUARANTINED,
                why,
            )
            return
        self._start_executor(dispatch)

    def _start_executor(
        self,
        dispatch: messaging_pb2.DispatchMessage,
        adopt: Container | None = None,
        journaled: JournalEntry | None = None,
    ) -> None:
        assert self._runtime is not None
        assert self._http is not None
        assert self._bus is not None
        executor = JobExecutor(
            dispatch,
            host_id=self.host_id,
            runtime=self._runtime,
            store=GrantedStore(dispatch.storage, self._http),
            settings=self.settings,
            report=self._bus.publish_report,
            publish_log=self._bus.publish_log,
            journal=self.journal,
            facts=self._host_facts(),
            scrubber=self.scrubber,
            on_uploaded=self.metrics.observe_upload if self.metrics else None,
        )
        key = (dispatch.job_id, dispatch.attempt)
        self.executors[key] = executor
        self.watchers.start(key, executor)
        task = self._spawn(executor.run(adopt, journaled))
        task.add_done_callback(lambda _: self._ended_attempt(key))

    def _host_facts(self) -> HostFacts | None:
        if self._bus is None or self._bus.signer is None or self.inventory is None:
            return None
        return HostFacts(self._bus.signer, self.inventory)

    def _ended_attempt(self, key: Key) -> None:
        self.executors.pop(key, None)
        self.watchers.close(key)
        self._ended[key] = None
        while len(self._ended) > _REMEMBERED_ATTEMPTS:
            self._ended.popitem(last=False)

    async def _report_once(
        self,
        dispatch: messaging_pb2.DispatchMessage,
        kind: messaging_pb2.JobReportKind.ValueType,
        stop_reason: messaging_pb2.StopReason.ValueType,
        reason: str,
        seq: int = 1,
    ) -> None:
        """A terminal report for an attempt that has no executor, then forget the attempt."""
        assert self._bus is not None
        report = messaging_pb2.JobReport(
            job_id=dispatch.job_id,
            attempt=dispatch.attempt,
            host_id=self.host_id,
            seq=seq,
            kind=kind,
            reason=reason,
            stop_reason=stop_reason,
        )
        report.time.GetCurrentTime()
        await self._bus.publish_report(report)
        await asyncio.to_thread(self.journal.remove, dispatch.job_id, dispatch.attempt)
        self._ended_attempt((dispatch.job_id, dispatch.attempt))

    # ---- commands ----------------------------------------------------------------------

    async def on_command(
        self, message: registry_pb2.ControlMessage
    ) -> registry_pb2.CommandAnswer.ValueType | None:
        """One command from the control plane (the Connect stream awaits it before reading
        on); returns the answer its CommandAck carries (daemon/commands.py)."""
        return await commands.answer(self, message)

    def start_probe(self, command: registry_pb2.ProbeCommand) -> None:
        """Runs a hardware verification probe (daemon/probe.py) in the background."""
        assert self._runtime is not None
        assert self.connect is not None
        self._spawn(run_probe(self._runtime, self.settings.work_dir, command, self.connect.send))

    # ---- identity and restarts ---------------------------------------------------------

    def _docker_client(self) -> docker.DockerClient:
        if self.settings.docker_host:
            return docker.DockerClient(base_url=self.settings.docker_host, version="auto")
        return docker.from_env()

    async def _register(self) -> HostIdentity:
        assert self.inventory is not None
        assert self._channel is not None
        return await register(self.settings, self.inventory, self._channel)

    async def _apply_offer(self) -> None:
        assert self.identity is not None
        assert self._channel is not None
        await apply_offer(self.settings, self.identity, self._channel)

    async def _reregister(self) -> str | None:
        """The credential was refused: register again when a token is at hand. Without one,
        or refused again (the host was revoked), the daemon gives up and stops."""
        if self.settings.registration_token is None or self.inventory is None:
            self._give_up(
                "the control plane refused this host's credential (revoked?) and no "
                "registration token is set: pass --token to register this host again"
            )
            return None
        assert self._channel is not None
        try:
            self.identity = await register(self.settings, self.inventory, self._channel)
        except RegistrationError as exc:
            self._give_up(str(exc))
            return None
        except grpc.aio.AioRpcError as exc:  # unreachable: the next reconnect tries again
            log.warning("re-registration failed: %s %s", exc.code().name, exc.details())
            return None
        if self._bus is not None:
            # Re-registration revokes the earlier NATS user; reconnects present the new one.
            self._bus.set_credentials(self.identity.nats_credentials)
        return self.identity.host_credential

    def _give_up(self, why: str) -> None:
        log.error("giving up: %s", why)
        self.fatal = why
        self._stopped.set()

    # ---- re-attach -----------------------------------------------------------------------

    async def reconcile(self, known: set[Key], listed_after: float) -> reattach.Plan:
        """Brings this host's containers in line with the control plane's `known` attempts
        (listed after `listed_after`, monotonic); see daemon/reattach.py for the rules."""
        assert self._runtime is not None
        async with self._reconciling:
            containers = await self._runtime.find_by_label(host=self.host_id)
            decided = reattach.plan(
                containers,
                known=known,
                leftovers=self.leftovers,
                running=set(self.executors),
                ended=set(self._ended),
            )
            for entry, container in decided.adopt:
                self._adopt(entry, container)
            for container in decided.orphans:
                await self._remove_orphan(container)
            for key, container in decided.unresumable:
                await self._runtime.stop(container)
                journaled = self.leftovers.get(key)
                await self._report_restarted(key, journaled.last_seq + 1 if journaled else 0)
            for container in decided.stray:
                await self._runtime.stop(container)
            await self._settle_vanished(containers)
            taken = {k: e.created_at for k, e in self.executors.items() if not e.terminal}
            for key in reattach.unlisted(taken, known, listed_after):
                log.warning("attempt %s/%s is not known to the control plane: stopping it", *key)
                reason = "orphaned: the control plane does not know this attempt"
                self._spawn(self.executors[key].cancel(StopReason.STOP_REASON_ORPHANED, reason))
            return decided

    def _adopt(self, entry: JournalEntry, container: Container) -> None:
        key = (entry.job_id, entry.attempt)
        dispatch = messaging_pb2.DispatchMessage.FromString(base64.b64decode(entry.dispatch_b64))
        self.leftovers.pop(key, None)
        self.reattached.append(key)
        # Listed before this run could exec into it: every one is an earlier run's.
        left = list(container.attrs.get("ExecIDs") or [])
        self._start_executor(dispatch, adopt=container, journaled=entry)
        if left:
            self._spawn(self._hang_up_left_execs(container, left))

    async def _hang_up_left_execs(self, container: Container, exec_ids: list[str]) -> None:
        """Ends what an earlier run of the daemon exec'd in an adopted container and still
        runs (exec_io.hang_up_left_execs): its clients went with that run."""
        assert self._runtime is not None
        api = self._runtime.client.api
        ended = await asyncio.to_thread(hang_up_left_execs, api, exec_ids)
        if ended:
            self.left_execs_ended += ended
            log.warning(
                "hung up %d exec(s) an earlier run left in container %s",
                ended,
                (container.id or "")[:12],
            )

    async def _remove_orphan(self, container: Container) -> None:
        """A container the control plane does not know: it, its journal entry and work dir go."""
        assert self._runtime is not None
        key = reattach.key_of(container)
        log.warning("removing orphan container %s (%s)", (container.id or "")[:12], key)
        await self._runtime.stop(container)
        self.orphans_removed += 1
        if key is None:
            return
        self.leftovers.pop(key, None)
        await asyncio.to_thread(self.journal.remove, *key)
        workdir = self.settings.attempt_dir(*key)
        await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)

    async def _settle_vanished(self, containers: list[Container]) -> None:
        """Leftover attempts whose container is gone: STOPPED (DAEMON_RESTARTED)."""
        for key in reattach.vanished(self.leftovers, containers):
            entry = self.leftovers[key]
            log.warning("attempt %s/%s was left by an earlier run; its container is gone", *key)
            await self._report_restarted(key, entry.last_seq + 1)

    async def _report_restarted(self, key: Key, seq: int) -> None:
        """The attempt cannot go on after the restart: STOPPED, provider fault, forgotten."""
        self.leftovers.pop(key, None)
        workdir = self.settings.attempt_dir(*key)
        await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)
        await self._report_once(
            messaging_pb2.DispatchMessage(job_id=key[0], attempt=key[1]),
            Kind.JOB_REPORT_KIND_STOPPED,
            StopReason.STOP_REASON_DAEMON_RESTARTED,
            "the host daemon restarted while the attempt ran",
            seq=seq or reattach.UNJOURNALED_SEQ,
        )

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)
        return task


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("daemon task failed", exc_info=task.exception())
