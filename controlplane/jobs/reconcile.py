"""Heartbeats reconciled with live attempts: a difference seen twice in a row sends a resync."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Set

from gpuplane.v1 import registry_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.commands.repository import CommandRepository
from controlplane.db.base import utcnow
from controlplane.jobs.billing import JobBilling
from controlplane.jobs.repository import JobRepository
from controlplane.jobs.states import AttemptState, JobState

log = logging.getLogger(__name__)
Key = tuple[str, int]
# Attempt states the control plane entered on its daemon's own report: the daemon took the
# dispatch, so its heartbeats must list the attempt. (A SCHEDULED one may still be in flight;
# the dispatch-ack timeout covers it.)
HEARD = frozenset({AttemptState.STARTING, AttemptState.RUNNING, AttemptState.UPLOADING})


class Reconciliation(JobBilling):
    """Part of JobService: each replica compares the running lists its connected daemons
    last sent (`RegistryService.running_lists`) with their live attempts, every
    `policy.reconcile_interval`. A host whose list misses an attempt the control plane heard
    run, or lists one that is not live, in two checks in a row gets a ResyncCommand (stored,
    delivered until acknowledged): one per missing attempt, naming it, else one for the
    host. The daemon stops containers the control plane does not know and answers a missing
    attempt it never ran NOT_RUNNING_HERE, which loses it at once (jobs/acks.py)."""

    async def reconcile_running(self, running_lists: Callable[[], Mapping[str, Set[Key]]]) -> int:
        """One check, if one is due, of the running lists `running_lists()` gives (host →
        its daemon's last list); returns how many resyncs were stored."""
        clock = time.monotonic()
        if clock < self._next_reconcile:
            return 0
        self._next_reconcile = clock + self.policy.reconcile_interval.total_seconds()
        running = running_lists()
        async with self.db.read() as session:
            rows = await JobRepository(session).live_on_hosts(sorted(running))
        live: dict[str, dict[Key, AttemptState]] = defaultdict(dict)
        for host_id, job_id, attempt, state in rows:
            live[host_id][(job_id, attempt)] = AttemptState(state)
        suspects: dict[str, set[Key]] = {}
        for host_id, listed in running.items():
            ours = live.get(host_id, {})
            missing = {k for k, state in ours.items() if state in HEARD and k not in listed}
            differ = missing | {k for k in listed if k not in ours}
            if differ:
                suspects[host_id] = differ
        previous, self._reconcile_suspects = self._reconcile_suspects, suspects
        confirmed = {
            host_id: keys & previous[host_id]
            for host_id, keys in suspects.items()
            if keys & previous.get(host_id, set())
        }
        if not confirmed:
            return 0
        return await self._resync(confirmed, live)

    async def _resync(
        self, confirmed: Mapping[str, set[Key]], live: Mapping[str, Mapping[Key, AttemptState]]
    ) -> int:
        now = utcnow()

        async def work(session: AsyncSession) -> int:
            commands = CommandRepository(session)
            stored = 0
            for host_id, keys in confirmed.items():
                ours = live.get(host_id, {})
                known = [_running_job(k, state) for k, state in sorted(ours.items())]
                missing = sorted(k for k in keys if k in ours)
                for key in missing:
                    resync = registry_pb2.ResyncCommand(
                        known_jobs=known, missing=_running_job(key, ours[key])
                    )
                    message = registry_pb2.ControlMessage(resync=resync)
                    await commands.issue(host_id, message, now, job_id=key[0], attempt=key[1])
                if not missing:
                    resync = registry_pb2.ResyncCommand(known_jobs=known)
                    await commands.issue(host_id, registry_pb2.ControlMessage(resync=resync), now)
                stored += len(missing) or 1
            return stored

        stored = await self.db.run(work)
        for host_id, keys in confirmed.items():
            log.warning(
                "host %s: heartbeats disagree with live attempts on %s: resync",
                host_id,
                sorted(keys),
            )
            self.streams.wake(host_id)
            if self.on_resync is not None:
                self.on_resync()
        return stored


class PeriodicResync(Reconciliation):
    """Part of JobService: every `resync_interval` seconds (0: never) each daemon connected
    to this replica is sent a ResyncCommand with the attempts live on its host, whatever its
    heartbeats say, straight on its stream (not stored: the next period sends another). The
    daemon destroys any gpuplane container the control plane does not know (left by a crash,
    or started by hand), logs it and counts it (gpuplane_daemon_orphans_removed_total)."""

    async def resync_connected(self, hosts: Collection[str]) -> int:
        """One round, if due, for the connected `hosts`; returns how many were sent."""
        clock = time.monotonic()
        if not self.resync_interval or clock < self._next_periodic_resync:
            return 0
        first = not self._next_periodic_resync
        self._next_periodic_resync = clock + self.resync_interval
        if first or not hosts:
            return 0  # connecting reconciled them just now (HelloAck)
        async with self.db.read() as session:
            rows = await JobRepository(session).live_on_hosts(sorted(hosts))
        live: dict[str, dict[Key, AttemptState]] = defaultdict(dict)
        for host_id, job_id, attempt, state in rows:
            live[host_id][(job_id, attempt)] = AttemptState(state)
        sent = 0
        for host_id in hosts:
            known = [_running_job(k, s) for k, s in sorted(live.get(host_id, {}).items())]
            resync = registry_pb2.ResyncCommand(known_jobs=known)
            sent += self.streams.send(host_id, registry_pb2.ControlMessage(resync=resync))
        return sent


def _running_job(key: Key, state: AttemptState) -> registry_pb2.RunningJob:
    return registry_pb2.RunningJob(job_id=key[0], attempt=key[1], state=JobState(state.value).pb)
