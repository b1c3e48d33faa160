"""Reconciling this host's job containers with its journal and the control plane's known jobs.

On every HelloAck and ResyncCommand the agent lists the containers labelled
gpuplane.host=<this host> and decides, per attempt (job id, attempt):

  container, journaled by an earlier run, known   adopt: a JobExecutor supervises it further
  container, not known to the control plane       orphan: container, journal entry and work
                                                  dir removed; nothing reported
  container, known, but nothing journaled         cannot be resumed (no dispatch): removed,
                                                  STOPPED, STOP_REASON_DAEMON_RESTARTED
  journaled by an earlier run, container gone     STOPPED, STOP_REASON_DAEMON_RESTARTED
                                                  (decided at start, without the control plane)
  running executor that the control plane does    cancelled (STOP_REASON_ORPHANED), if taken
  not list                                        before the listing could have included it

"Known" means listed in HelloAck.known_jobs / ResyncCommand.known_jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from docker.models.containers import Container

from daemon.journal import JournalEntry
from daemon.runtime import LABEL_ATTEMPT, LABEL_JOB

log = logging.getLogger(__name__)

Key = tuple[str, int]
# The seq of a terminal report for an attempt whose journal is lost: above any real one, so
# the control plane does not take it for a duplicate.
UNJOURNALED_SEQ = 1 << 30


def key_of(container: Container) -> Key | None:
    """(job id, attempt) from a container's labels; None when they are malformed."""
    labels = container.labels or {}
    job_id = labels.get(LABEL_JOB, "")
    try:
        attempt = int(labels.get(LABEL_ATTEMPT, ""))
    except ValueError:
        return None
    return (job_id, attempt) if job_id and attempt > 0 else None


@dataclass
class Plan:
    """What to do with each of this host's containers and leftover journal entries."""

    adopt: list[tuple[JournalEntry, Container]] = field(default_factory=list)
    orphans: list[Container] = field(default_factory=list)
    unresumable: list[tuple[Key, Container]] = field(default_factory=list)
    # Containers of attempts that ended in this process whose removal failed: removed quietly.
    stray: list[Container] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.adopt or self.orphans or self.unresumable or self.stray)


def plan(
    containers: Iterable[Container],
    *,
    known: Collection[Key],
    leftovers: Mapping[Key, JournalEntry],
    running: Collection[Key],
    ended: Collection[Key],
) -> Plan:
    """Decides per container; `running` attempts (live executors) are left alone here."""
    result = Plan()
    for container in containers:
        key = key_of(container)
        if key is None:
            result.orphans.append(container)
        elif key in running:
            continue
        elif key not in known:
            result.orphans.append(container)
        elif key in leftovers and leftovers[key].dispatch_b64:
            result.adopt.append((leftovers[key], container))
        elif key in ended:
            result.stray.append(container)
        else:
            result.unresumable.append((key, container))
    return result


def vanished(leftovers: Mapping[Key, JournalEntry], containers: Iterable[Container]) -> list[Key]:
    """Leftover attempts whose container no longer exists."""
    present = {key_of(c) for c in containers}
    return [key for key in leftovers if key not in present]


def unlisted(
    running: Mapping[Key, float], known: Collection[Key], listed_after: float
) -> list[Key]:
    """Running attempts (key → when taken, monotonic) missing from `known`, counting only
    those taken before `listed_after`: a dispatch taken later may postdate the listing."""
    return [key for key, taken in running.items() if key not in known and taken < listed_after]
