"""What a daemon's report may claim, bounded by the control plane's own clock: run time by
what it observed, seq by how far a real daemon's reports can run ahead."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from controlplane.jobs.models import JobAttempt

# A daemon numbers its reports 1, 2, 3, … per attempt (a restarted one continues from its
# journal + 2), so an honest report is at most a few ahead of the last one applied. Further
# than this is a forgery meant to fence the daemon's real reports out: it is refused. Only
# terminal reports may jump (a daemon that lost its journal ends the attempt with seq 2**30):
# they end the attempt, so nothing later can be fenced out by them.
MAX_SEQ_JUMP = 100


class RefusedReport(Exception):
    """A report that is not applied and never will be (the consumer terminates it); `reason`
    labels the dropped-reports metric."""

    reason = "refused"


class ForeignReport(RefusedReport):
    """A report on a subject of a host that is not the host of the attempt it is about: a
    host writing about another host's job (its NATS user may publish only under its own
    subject prefix, so this is a bug or a forgery)."""

    reason = "foreign_host"


class ImplausibleSeq(RefusedReport):
    """A non-terminal report whose seq is more than MAX_SEQ_JUMP above the last one applied."""

    reason = "seq_jump"


@dataclass(frozen=True, slots=True)
class RunTime:
    """A report's run time as taken: at most `observed_ms` (+ slack)."""

    claimed_ms: int
    observed_ms: int
    slack_ms: int

    @property
    def capped(self) -> bool:
        return self.claimed_ms > self.observed_ms + self.slack_ms

    @property
    def taken_ms(self) -> int:
        return min(self.claimed_ms, self.observed_ms + self.slack_ms)


def observed_run_time(
    attempt: JobAttempt, claimed_ms: int, now: datetime, slack: timedelta
) -> RunTime:
    """The run time the control plane can vouch for at `now`, when it accepts a report: since
    it accepted the attempt's first RUNNING report (`started_at`), or, when it never saw one
    (the reports collapsed), since it placed the attempt: nothing runs before its placement."""
    since = attempt.started_at or attempt.created_at
    observed = max(0, int((now - since) / timedelta(milliseconds=1)))
    return RunTime(claimed_ms, observed, int(slack / timedelta(milliseconds=1)))


def check_seq(attempt: JobAttempt, seq: int, terminal: bool) -> bool:
    """Sequence fencing: whether a report with `seq` is applied (its seq then recorded). A
    non-terminal report must be newer than the last one applied, and not implausibly far
    ahead (ImplausibleSeq: refused, recording nothing). A terminal report is applied while
    its attempt is live whatever its seq, so no report, forged or not, can hold back the end
    of an attempt."""
    if not terminal:
        if seq <= attempt.report_seq:
            return False
        if seq > attempt.report_seq + MAX_SEQ_JUMP:
            raise ImplausibleSeq(
                f"seq {seq} is more than {MAX_SEQ_JUMP} above the last one applied "
                f"({attempt.report_seq})"
            )
    attempt.report_seq = max(attempt.report_seq, seq)
    return True
