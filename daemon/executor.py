"""Runs one dispatched attempt end to end and reports each step as a JobReport.

Reports per outcome (seq from 1, strictly increasing; USAGE, the run-time report, repeats
while running), with the StopReason (STOP_REASON_...) of the terminal one:
  exited       STARTING, RUNNING, USAGE*, UPLOADING(exit), FINISHED(exit, manifest, oom):
               COMPLETED, EXITED_WITH_ERROR or OOM_KILLED
  timed out    ... UPLOADING(exit), FINISHED(TIMED_OUT), outputs still stored
  budget spent ... UPLOADING(exit), FINISHED(BUDGET_EXHAUSTED), outputs still stored: at the
               dispatch's budget_run_time_ms, or on a BUDGET_EXHAUSTED cancel once running
  cancelled    [STARTING, [RUNNING, USAGE*, [UPLOADING]]], STOPPED(the cancel's reason:
               CANCELLED, HOLD_EXPIRED, ORPHANED, or BUDGET_EXHAUSTED before it ran)
  can't start  STARTING, FAILED_TO_START(INPUT_UNAVAILABLE (bad or missing input),
               HOST_ERROR (an input the host could not fetch), IMAGE_UNAVAILABLE (the
               registry refused the image), IMAGE_PULL_FAILED (the host could not pull it)
               or CONTAINER_ERROR; `reason` says why)
  late         FAILED_TO_START(DISPATCH_EXPIRED)      (dispatch past its deadline)
  host fault   STOPPED(HOST_ERROR) once running, else FAILED_TO_START(HOST_ERROR)
  adopted      (after a daemon restart; seq continues from the journaled one + 2) [RUNNING],
               USAGE*, then as above; the uploaded logs are the container's whole logs
  replica      a service replica's container that exits or fails its liveness probe is
               started again in place, RUNNING throughout (daemon/restarts.py), until its
               restarts are used up: then as exited, or STOPPED(LIVENESS_FAILED)
Uploads are retried `upload_attempts` times with exponential backoff while the attempt stays
UPLOADING; then FINISHED carries UPLOAD_FAILED with whatever manifest was stored (outputs
over `output_max_bytes` are not stored at all: logs only, OUTPUT_TOO_LARGE, `reason` why).
Each step is a Progress (daemon/progress.py): the executor's, the journal's and the report's.
The terminal report carries the scrub attestation of the attempt's GPUs (daemon/scrub.py),
read once the container is removed (which runs while the results are stored).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeAlias, TypeVar

from docker.models.containers import Container
from gpuplane.v1 import messaging_pb2

from daemon.endings import (
    START_FAILURES,
    RunLimit,
    finished_detail,
    finished_reason,
    run_limit,
    start_failure,
)
from daemon.inputs import ObjectReader, fetch_inputs, make_work_dir
from daemon.journal import Journal, JournalEntry
from daemon.logstream import LogFollower, LogPump, PublishLog, drain_logs
from daemon.progress import Progress
from daemon.provenance import HostFacts, finished_attestations
from daemon.restarts import ReplicaRestarts
from daemon.runtime import DockerRuntime, ExitInfo, quietly
from daemon.scrub import Scrubber
from daemon.settings import DaemonSettings
from daemon.uploads import store_results
from messaging.jsonlog import log_fields
from messaging.subjects import logs_subject
from storage.upload import ObjectWriter

log = logging.getLogger(__name__)
Kind = messaging_pb2.JobReportKind
StopReason = messaging_pb2.StopReason
Reason: TypeAlias = messaging_pb2.StopReason.ValueType
ReportFn = Callable[[messaging_pb2.JobReport], Awaitable[None]]
T = TypeVar("T")
# How watching a running container ended.
Watched: TypeAlias = Literal["exited", "cancelled", "stopped"]
TERMINAL = frozenset(
    {
        Kind.JOB_REPORT_KIND_FINISHED,
        Kind.JOB_REPORT_KIND_STOPPED,
        Kind.JOB_REPORT_KIND_FAILED_TO_START,
    }
)


class AttemptStore(ObjectReader, ObjectWriter, Protocol):
    """What an attempt reads its inputs from and stores its results in."""


class _Cancelled(Exception):
    """cancel() was called while the attempt was preparing or uploading."""


class JobExecutor:
    """One attempt: inputs → container → logs and run-time reports → results stored → report."""

    def __init__(
        self,
        dispatch: messaging_pb2.DispatchMessage,
        *,
        host_id: str,
        runtime: DockerRuntime,
        store: AttemptStore,
        settings: DaemonSettings,
        report: ReportFn,
        publish_log: PublishLog | None = None,
        journal: Journal | None = None,
        facts: HostFacts | None = None,
        scrubber: Scrubber | None = None,
        on_uploaded: Callable[[messaging_pb2.StopReason.ValueType, float], None] | None = None,
    ) -> None:
        self.dispatch = dispatch
        self.job_id, self.attempt = dispatch.job_id, dispatch.attempt
        self.host_id = host_id
        self.runtime = runtime
        # The agent's is a GrantedStore of this dispatch's grant (no key of the daemon's own).
        self.store = store
        self.settings = settings
        self._report = report
        self._publish_log = publish_log
        self.journal = journal
        self.scrubber = scrubber
        # Told how storing the results ended (a StopReason) and how long it took (metrics).
        self._on_uploaded = on_uploaded
        self.progress = Progress.ACCEPTED
        self.terminal: messaging_pb2.JobReport | None = None
        self.work_dir = settings.attempt_dir(self.job_id, self.attempt)
        self._seq = 0
        self._lock = asyncio.Lock()
        self._cancel = asyncio.Event()
        self._cancel_reason: Reason = StopReason.STOP_REASON_CANCELLED
        self._cancel_text = ""
        # A BUDGET_EXHAUSTED cancel once the container ran: stopped as at a time limit.
        self._budget_spent = asyncio.Event()
        self._done = asyncio.Event()
        self._container: Container | None = None
        self._image: dict[str, Any] | None = None  # its inspect before create (not adopted)
        self._removal: asyncio.Future[None] | None = None  # of its container, once exited
        self._started_at = 0.0
        self.created_at = time.monotonic()
        self.adopted = False
        # The host's key and GPUs: FINISHED reports carry signed provenance (None: they don't).
        self.facts = facts
        replica = dispatch.spec.HasField("service_replica")  # restarted in place, or not
        self.replica = ReplicaRestarts(self, settings) if replica else None

    # ---- control ---------------------------------------------------------------------------

    async def cancel(
        self, reason: Reason = StopReason.STOP_REASON_CANCELLED, text: str = ""
    ) -> None:
        """Stops the attempt (container killed and removed) and returns once STOPPED is out,
        which carries `reason` and `text` (default "cancelled"). A budget stop of a container
        that has started ends it as its budget's run time would (outputs stored, FINISHED)."""
        self.request_stop(reason, text)
        await self._done.wait()

    def request_stop(self, reason: Reason, text: str = "") -> None:
        """cancel() without waiting for the attempt's end."""
        if reason == StopReason.STOP_REASON_BUDGET_EXHAUSTED and self._started_at:
            self._budget_spent.set()
        elif not self._cancel.is_set():
            self._cancel_reason = reason or StopReason.STOP_REASON_CANCELLED
            self._cancel_text = text or "cancelled"
            self._cancel.set()

    @property
    def container_id(self) -> str:
        return (self._container.id or "") if self._container is not None else ""

    @property
    def restarts(self) -> int:  # a replica's restarts in place so far
        return self.replica.policy.made if self.replica is not None else 0

    async def run(
        self, adopt: Container | None = None, journaled: JournalEntry | None = None
    ) -> messaging_pb2.JobReport:
        """Runs the attempt (see _attempt); each line logged meanwhile carries its ids."""
        with log_fields(job_id=self.job_id, attempt=self.attempt, host_id=self.host_id):
            log.info("attempt %s/%s: %s", self.job_id, self.attempt, self.dispatch.spec.image)
            report = await self._attempt(adopt, journaled)
            kind = messaging_pb2.JobReportKind.Name(report.kind)
            log.info("attempt %s/%s ended: %s", self.job_id, self.attempt, kind)
            return report

    async def _attempt(
        self, adopt: Container | None, journaled: JournalEntry | None
    ) -> messaging_pb2.JobReport:
        """Runs the attempt to its terminal report and returns that report. With `adopt`, the
        attempt's container exists already (left by an earlier run of the daemon, whose
        journal entry is `journaled`): it is supervised from where it is, not restarted.

        Cancelled as a task (daemon shutdown), it leaves the container, the work dir and the
        journal entry in place for a restarted daemon to find."""
        abandoned = False
        try:
            if adopt is not None:
                return await self._resume(adopt, journaled)
            return await self._run()
        except asyncio.CancelledError:
            abandoned = True
            raise
        except Exception as exc:  # noqa: BLE001 - a host fault must still end the attempt
            log.exception("attempt %s/%s failed on this host", self.job_id, self.attempt)
            return await self._host_fault(exc)
        finally:
            self._done.set()
            if not abandoned:
                if self._container is not None:
                    await quietly(self.runtime.stop(self._container))
                await asyncio.to_thread(shutil.rmtree, self.work_dir, ignore_errors=True)

    # ---- the attempt -----------------------------------------------------------------------

    async def _run(self) -> messaging_pb2.JobReport:
        deadline = self.dispatch.deadline
        if self.dispatch.HasField("deadline") and deadline.ToDatetime(UTC) < datetime.now(UTC):
            return await self._emit(
                Kind.JOB_REPORT_KIND_FAILED_TO_START,
                stop_reason=StopReason.STOP_REASON_DISPATCH_EXPIRED,
                reason="the dispatch arrived after its deadline",
            )
        if self._cancel.is_set():
            return await self._stopped(None)
        await self._advance(Progress.STARTING)
        try:
            container = await self._start()
        except _Cancelled:
            return await self._stopped(self._container)
        except tuple(START_FAILURES) as exc:
            return await self._emit(
                Kind.JOB_REPORT_KIND_FAILED_TO_START,
                stop_reason=start_failure(exc),
                reason=str(exc),
            )
        self._started_at = time.monotonic()
        await self._advance(Progress.RUNNING)
        return await self._watch(container, run_limit(self.dispatch))

    async def _resume(
        self, container: Container, journaled: JournalEntry | None
    ) -> messaging_pb2.JobReport:
        """Adopts a container left by an earlier run of the daemon: reports continue from the
        journaled seq, its run limit counts from the container's start, logs are followed
        from now on (the uploaded files come whole from Docker at exit)."""
        self.adopted = True
        self._container = container
        self._started_at = time.monotonic()  # it ran before: a host fault from here is STOPPED
        journaled_progress = journaled.state if journaled else Progress.ACCEPTED
        # One seq is skipped: a report published just before the old daemon stopped may not
        # have reached the journal, and a different report must not reuse its seq (msg id).
        self._seq = journaled.last_seq + 1 if journaled else 0
        await asyncio.to_thread(self.work_dir.mkdir, parents=True, exist_ok=True)
        info = await self.runtime.inspect(container)
        if not info.started:
            await self.runtime.start(container)
            info = await self.runtime.inspect(container)
        elapsed = info.run_time_ms / 1000
        if self.replica is not None and journaled is not None:
            elapsed = self.replica.resumed(journaled, elapsed)
        self._started_at = time.monotonic() - elapsed
        if journaled_progress in (Progress.ACCEPTED, Progress.STARTING):
            await self._advance(Progress.RUNNING)
        else:
            self.progress = Progress.RUNNING  # reported by the earlier run
        limit = run_limit(self.dispatch).after(elapsed)
        if info.status in ("exited", "dead"):
            limit = RunLimit(0.0)  # it ended while no daemon watched: its exit is what counts
        what = f"container {(container.id or '')[:12]} ({info.status}, {elapsed:.1f}s in)"
        log.info("attempt %s/%s re-attached to %s", self.job_id, self.attempt, what)
        return await self._watch(container, limit)

    async def _watch(self, container: Container, limit: RunLimit) -> messaging_pb2.JobReport:
        """A started container: logs, run-time reports and its time limit until it ends (a
        replica's restarted in place meanwhile: daemon/restarts.py), then its results."""
        follower, pump, pump_task = self._follow(container)
        try:
            outcome = await self._supervise(container, limit)
            while outcome == "exited" and self.replica is not None:
                if (restarted := await self.replica.after_exit(container)) is None:
                    break
                follower.close()
                await asyncio.wait({pump_task}, timeout=2.0)
                if not restarted:
                    break
                follower, pump, pump_task = self._follow(container)
                outcome = await self._supervise(container, limit)
            if self._cancel.is_set():  # during a backoff, or its liveness restarts used up
                outcome = "cancelled"
            watched_ms = self._run_time_ms()
            if outcome == "cancelled":
                stopped = await self._stopped(container)
                await asyncio.wait({pump_task}, timeout=2.0)
                await pump.end()
                return stopped
            # An exit of its own (not this daemon's kill) may be an OOM kill reported late.
            info = await self.runtime.inspect_exited(container, settle=outcome == "exited")
            # Docker stamps StartedAt when its start call is done, which on a busy host can be
            # after a short job has already exited (FinishedAt is the exit's own time), so
            # its run time comes out 0: the job would be free. Docker's times stay the bill;
            # only when they say 0 does the time this daemon watched it run (from its start
            # call's return to the exit, as the run-time reports count) stand in. An adopted
            # container's start was not watched: Docker's times are all there is.
            # A replica restarted in place ran (and is billed) from its first start.
            if self.restarts or (not info.run_time_ms and not self.adopted):
                info = replace(info, run_time_ms=watched_ms)
            name, whole = f"{self.job_id}/{self.attempt}", self.adopted or self.restarts > 0
            await drain_logs(self.runtime, container, pump_task, follower, pump, whole, name)
            await pump.end()
        finally:
            follower.close()
            pump_task.cancel()
        self._removal = asyncio.ensure_future(self.runtime.stop(container))  # as it uploads
        spent = self._budget_spent.is_set()
        limited = limit.stop_reason(spent) if outcome == "stopped" else None
        return await self._collect(info, pump, stopped=limited)

    def _follow(self, container: Container) -> tuple[LogFollower, LogPump, asyncio.Task[None]]:
        """Its logs into a pump: all, from now on when adopted, or since its latest restart."""
        since = self.replica.logs_since if self.replica is not None else None
        follower = self.runtime.follow_logs(container, from_now=self.adopted, since=since)
        subject = logs_subject(self.host_id, self.job_id, self.attempt)
        pump = LogPump(subject, self._publish_log, self.work_dir)
        return follower, pump, asyncio.create_task(pump.pump(follower))

    async def _start(self) -> Container:
        """Work dir, inputs, image, container; racing each slow step against cancel()."""
        await asyncio.to_thread(make_work_dir, self.work_dir)
        inputs = list(self.dispatch.spec.inputs)
        await self._unless_cancelled(
            fetch_inputs(self.store, self.dispatch.tenant_id, inputs, self.work_dir / "input")
        )
        image = await self._unless_cancelled(self.runtime.ensure_image(self.dispatch.spec.image))
        container = await self.runtime.create(self.dispatch, self.work_dir, image)
        self._image = image
        self._container = container
        await self._journal(container_id=container.id)
        if self._cancel.is_set():
            raise _Cancelled
        await self.runtime.start(container)
        return container

    async def _supervise(self, container: Container, limit: RunLimit) -> Watched:
        """Waits for exit, cancel(), a budget stop or the limit; returns "exited",
        "cancelled" or "stopped" (at the limit or by the budget stop: killed)."""
        run_time_stop = asyncio.Event()
        run_time = asyncio.create_task(self._run_time_loop(run_time_stop))
        exited = asyncio.create_task(self.runtime.wait(container, limit.seconds or None))
        stops = [asyncio.create_task(e.wait()) for e in (self._cancel, self._budget_spent)]
        try:
            await asyncio.wait({exited, *stops}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            run_time_stop.set()
            await run_time
            for stop in stops:
                stop.cancel()
        if self._cancel.is_set():
            exited.cancel()
            return "cancelled"
        if exited.done() and exited.result() is not None:
            return "exited"
        exited.cancel()
        reason = StopReason.Name(limit.stop_reason(self._budget_spent.is_set()))
        log.info("attempt %s/%s stopped (%s): killing it", self.job_id, self.attempt, reason)
        await self.runtime.kill(container)
        await self.runtime.wait(container, 30)
        return "stopped"

    async def _run_time_loop(self, stop: asyncio.Event) -> None:
        interval = self.settings.usage_report_interval_seconds
        while True:
            try:
                await asyncio.wait_for(stop.wait(), interval)
                return
            except TimeoutError:
                await self._emit(Kind.JOB_REPORT_KIND_USAGE, run_time_ms=self._run_time_ms())

    async def _collect(
        self, info: ExitInfo, pump: LogPump, *, stopped: Reason | None
    ) -> messaging_pb2.JobReport:
        ended = datetime.now(UTC)  # the host's clock when the container had exited
        await self._advance(
            Progress.UPLOADING, exit_code=info.exit_code, run_time_ms=info.run_time_ms
        )
        started = time.perf_counter()
        try:
            stored = await self._unless_cancelled(
                store_results(
                    self.store, self.dispatch, self.work_dir / "output", pump.paths, self.settings
                )
            )
        except _Cancelled:
            stored = None
        if self._removal is not None:  # gone before the end's scrub reads its GPUs
            await self._removal
        self._container = None
        finished: dict[str, Any] = {"exit_code": info.exit_code, "run_time_ms": info.run_time_ms}
        if stored is None:
            why = {"stop_reason": self._cancel_reason, "reason": self._cancel_text}
            return await self._emit(Kind.JOB_REPORT_KIND_STOPPED, **finished, **why)
        if self._on_uploaded is not None:
            self._on_uploaded(stored.failure, time.perf_counter() - started)
        finished["manifest"] = stored.manifest
        host = (self.runtime, self.facts, self.scrubber, self.dispatch, self.host_id)
        attested = await finished_attestations(*host, finished, ended, self._image)
        return await self._emit(
            Kind.JOB_REPORT_KIND_FINISHED,
            **finished,
            **attested,
            oom_killed=info.oom_killed,
            stop_reason=finished_reason(info, stored, stopped=stopped),
            reason=finished_detail(info, stored),
        )

    async def _stopped(self, container: Container | None) -> messaging_pb2.JobReport:
        """cancel(): kill, note the run time, remove, then report STOPPED."""
        fields: dict[str, Any] = {"stop_reason": self._cancel_reason, "reason": self._cancel_text}
        if container is not None:
            await self.runtime.kill(container)
            info = await quietly(self.runtime.inspect(container))
            await self.runtime.stop(container)
            self._container = None
            if self.restarts:  # a replica restarted in place ran from its first start
                fields["run_time_ms"] = self._run_time_ms()
            elif info is not None:
                fields["run_time_ms"] = info.run_time_ms
        return await self._emit(Kind.JOB_REPORT_KIND_STOPPED, **fields)

    async def _host_fault(self, exc: Exception) -> messaging_pb2.JobReport:
        if self.terminal is not None:
            return self.terminal
        reason = f"host error: {exc}"
        if self._container is not None:  # gone before the scrub reads its GPUs
            await quietly(self.runtime.stop(self._container))
        if self._started_at:
            return await self._emit(
                Kind.JOB_REPORT_KIND_STOPPED,
                stop_reason=StopReason.STOP_REASON_HOST_ERROR,
                reason=reason,
                run_time_ms=self._run_time_ms(),
            )
        return await self._emit(
            Kind.JOB_REPORT_KIND_FAILED_TO_START,
            stop_reason=StopReason.STOP_REASON_HOST_ERROR,
            reason=reason,
        )

    # ---- helpers ---------------------------------------------------------------------------

    async def _advance(self, progress: Progress, **fields: Any) -> messaging_pb2.JobReport:
        """The attempt reaches `progress`: reported (with `fields`) and journaled."""
        self.progress = progress
        return await self._emit(progress.report_kind, **fields)

    async def _emit(
        self, kind: messaging_pb2.JobReportKind.ValueType, **fields: Any
    ) -> messaging_pb2.JobReport:
        """Publishes the next report (seq + 1) through the callback, then journals it."""
        async with self._lock:
            if self.terminal is not None:
                return self.terminal
            if kind in TERMINAL and self.scrubber is not None and "scrub" not in fields:
                # The container is removed by now: its GPUs should be empty again.
                fields["scrub"] = await self.scrubber.check(self.dispatch.gpu_uuids)
            self._seq += 1
            report = messaging_pb2.JobReport(
                job_id=self.job_id,
                attempt=self.attempt,
                host_id=self.host_id,
                seq=self._seq,
                kind=kind,
                **fields,
            )
            report.time.GetCurrentTime()
            await self._report(report)
            if kind in TERMINAL:
                self.terminal = report
                if self.journal is not None:
                    await asyncio.to_thread(self.journal.remove, self.job_id, self.attempt)
            else:
                await self._journal(last_seq=self._seq, state=self.progress)
            return report

    async def _journal(self, **changes: Any) -> None:
        if self.journal is not None:
            await asyncio.to_thread(self.journal.update, self.job_id, self.attempt, **changes)

    async def _unless_cancelled(self, work: Coroutine[Any, Any, T]) -> T:
        task = asyncio.ensure_future(work)
        cancelled = asyncio.ensure_future(self._cancel.wait())
        await asyncio.wait({task, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        cancelled.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _Cancelled

    def _run_time_ms(self) -> int:
        return int((time.monotonic() - self._started_at) * 1000) if self._started_at else 0
