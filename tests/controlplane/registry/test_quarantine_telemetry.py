"""A host's quarantine in telemetry (`quarantine_reason`): the GPU turns unhealthy with the
host's reason made safe (control characters replaced, length bounded), stays so while the
host says it, and recovers a clean period after the host stops saying it."""

from __future__ import annotations

import time

from controlplane.registry.telemetry import (
    MAX_QUARANTINE_REASON,
    QUARANTINED,
    TelemetryBuffer,
)
from controlplane.registry.utilization import AttemptUtilizationBook
from tests.controlplane.registry.test_telemetry_buffer import HOST, UUIDS, batch, rows, sample


def test_quarantine_makes_the_gpu_unhealthy_until_the_host_releases_it() -> None:
    buffer = TelemetryBuffer(AttemptUtilizationBook(10), history=3, ignored_xids=())
    now = time.time()
    buffer.attach(HOST, rows(), now)
    said = "1 process(es) left\x00\x1b[31m on it " + "x" * 5000
    outcome = buffer.apply(
        HOST, batch(sample(quarantine_reason=said), sample(UUIDS[1]), at=now), now
    )
    assert outcome.accepted == 2
    [change] = outcome.changes
    assert change.uuid == UUIDS[0]
    assert change.healthy is False
    shown = change.reason.removeprefix(f"{QUARANTINED}: ")
    assert shown.startswith("1 process(es) left\ufffd\ufffd[31m on it xxx")
    assert len(shown) == MAX_QUARANTINE_REASON
    assert all(c.isprintable() for c in change.reason)

    # Still quarantined past the clean period: each sample that says so is a new fault.
    series = buffer.hosts[HOST].gpus[UUIDS[0]]
    later = now + 5
    buffer.apply(HOST, batch(sample(quarantine_reason="still"), sample(UUIDS[1]), at=later), later)
    assert not series.recover(later + 0.5, clean_period=1.0)
    # Released: no flag any more; healthy a clean period after the last flagged sample.
    buffer.apply(HOST, batch(sample(), sample(UUIDS[1]), at=later + 1), later + 1)
    assert not series.recover(later + 0.9, clean_period=1.0)
    assert series.recover(later + 1.5, clean_period=1.0)
    assert (series.healthy, series.reason) == (True, "")
