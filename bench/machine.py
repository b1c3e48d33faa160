"""What the machine took from a measurement: the share of CPU time the hypervisor gave to
other guests (steal), which on a shared 2-core VM moves figures by a third or more, and the
CPU all processes used (the bench process and its servers: PostgreSQL, NATS...)."""

from __future__ import annotations

import os
from pathlib import Path

PROC_STAT = Path("/proc/stat")


def _all_cpus() -> list[int] | None:
    """user nice system idle iowait irq softirq steal ticks since boot, all CPUs (guest time
    is already in user/nice); None where /proc/stat cannot be read or has no steal."""
    try:
        first = PROC_STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if first[0] != "cpu" or len(first) < 9:
        return None
    return [int(v) for v in first[1:9]]


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) CPU ticks since boot, all CPUs; None where /proc/stat has no steal."""
    ticks = _all_cpus()
    return None if ticks is None else (ticks[7], sum(ticks))


def steal_percent(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Steal as a percentage of all CPU time between two cpu_ticks() readings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round(100 * (after[0] - before[0]) / (after[1] - before[1]), 1)


def busy_seconds() -> float | None:
    """CPU seconds all processes used since boot, all CPUs (neither idle, iowait nor steal);
    None where /proc/stat cannot be read."""
    ticks = _all_cpus()
    if ticks is None:
        return None
    busy = sum(ticks) - ticks[3] - ticks[4] - ticks[7]
    return busy / os.sysconf("SC_CLK_TCK")


def per_item_us(before: float | None, after: float | None, items: int) -> int:
    """Microseconds of machine CPU per item between two busy_seconds() readings (-1: unknown)."""
    if before is None or after is None or items <= 0:
        return -1
    return round((after - before) / items * 1e6)


def postgres_seconds(data_dir: Path) -> float | None:
    """CPU seconds the PostgreSQL cluster of `data_dir` used so far: its postmaster and the
    backends it started (their own, not other processes' on a shared machine); None where its
    pid file or /proc cannot be read."""
    try:
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(entry.name) == postmaster or int(fields[1]) == postmaster:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def whole_machine_millicores() -> int:
    """Every core of this machine in thousandths, for a benchmark's container: the floor's
    program beside it runs without a CPU limit, so the container's must not have one either
    (a 1-GPU job's default share on the bench's 8-GPU daemon is 1/8 of the cores, which then
    caps what the program can answer, not what the path under test can carry)."""
    return (os.cpu_count() or 1) * 1000
