"""Bulk job commands against a real control plane: `jobs cancel` of several ids or by label,
and `jobs list --since/--until`."""

from __future__ import annotations

import asyncio
import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from gpuplane.v1 import types_pb2

from gpuplane_cli.main import main
from gpuplane_cli.units import parse_time
from tests.harness import JobPlane

S = types_pb2
pytestmark = pytest.mark.timeout(120)


async def cli(plane: JobPlane, *argv: str) -> int:
    """`gpuplane` as the consumer, in a thread: it runs its own event loop."""
    environ = {"GPUPLANE_ADDR": plane.address, "GPUPLANE_PLAINTEXT": "1"}
    return await asyncio.to_thread(main, ["--api-key", plane.consumer_key, *argv], environ)


class Terminal(io.StringIO):
    """A stdin that says it is a terminal, with the answer already typed."""

    def isatty(self) -> bool:
        return True


async def test_cancel_by_label_counts_confirms_and_cancels_only_the_matching(
    plane: JobPlane, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = [(await plane.submit(labels={"team": "x"})).job_id for _ in range(3)]
    other = (await plane.submit(labels={"team": "y"})).job_id
    capsys.readouterr()

    assert await cli(plane, "jobs", "cancel", "--label", "team=x") == 1
    out, err = capsys.readouterr()
    assert "3 unfinished job(s) with team=x" in err
    assert "without --yes (stdin is not a terminal)" in err
    assert out == ""
    assert (await plane.get(ours[0])).state == S.JOB_STATE_QUEUED, "nothing cancelled"

    monkeypatch.setattr("sys.stdin", Terminal("n\n"))
    assert await cli(plane, "jobs", "cancel", "--label", "team=x") == 1
    assert "cancel 3 job(s)? [y/N] error: nothing cancelled" in capsys.readouterr().err

    monkeypatch.setattr("sys.stdin", Terminal("y\n"))
    assert await cli(plane, "jobs", "cancel", "--label", "team=x", "--reason", "bulk") == 0
    out, _ = capsys.readouterr()
    assert sorted(out.splitlines()) == sorted(f"job {j} CANCELLED" for j in ours)
    for job_id in ours:
        job = await plane.get(job_id)
        assert job.state == S.JOB_STATE_CANCELLED
    assert (await plane.get(other)).state == S.JOB_STATE_QUEUED

    assert await cli(plane, "jobs", "cancel", "--label", "team=x", "--yes") == 0
    assert "0 unfinished job(s) with team=x" in capsys.readouterr().err


async def test_cancel_of_several_ids_reports_each_and_names_the_failures(
    plane: JobPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = [(await plane.submit()).job_id for _ in range(2)]
    capsys.readouterr()
    code = await cli(plane, "jobs", "cancel", first, "job_00000000000000000000000000000000", second)
    out, err = capsys.readouterr()
    assert code == 3, err
    assert out.splitlines() == [f"job {first} CANCELLED", f"job {second} CANCELLED"]
    assert "job job_00000000000000000000000000000000: NOT_FOUND: " in err
    assert err.endswith("error: 1 of 3 cancels failed: job_00000000000000000000000000000000\n")
    assert (await plane.get(second)).state == S.JOB_STATE_CANCELLED, "a failure stops nothing"

    assert await cli(plane, "jobs", "cancel", first, "--label", "a=b") == 2
    assert "give job ids or --label" in capsys.readouterr().err
    assert await cli(plane, "jobs", "cancel") == 2
    assert "name the jobs to cancel" in capsys.readouterr().err


async def test_list_since_and_until_take_durations_and_times(
    plane: JobPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = (await plane.submit()).job_id
    later = (datetime.now(UTC) + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")

    async def listed(*flags: str) -> list[str]:
        capsys.readouterr()
        assert await cli(plane, "--json", "jobs", "list", *flags) == 0
        return [job["job_id"] for job in json.loads(capsys.readouterr().out)]

    assert job_id in await listed("--since", "1h")
    assert job_id not in await listed("--until", "1h")
    assert job_id in await listed("--since", "2000-01-01", "--until", later)
    assert job_id not in await listed("--since", later)
    with pytest.raises(SystemExit) as usage:
        await cli(plane, "jobs", "list", "--since", "yesterday")
    assert usage.value.code == 2
    assert "is neither a duration ago (2h, 1d) nor a time" in capsys.readouterr().err


def test_parse_time_reads_durations_ago_and_rfc3339() -> None:
    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    assert parse_time("2h", now) == datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    assert parse_time("1d", now) == datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    assert parse_time("2026-11-23T10:00:00Z") == datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    offset = parse_time("2026-11-23T11:00:00+01:00")
    assert offset.astimezone(UTC) == datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    assert parse_time("2026-11-23") == datetime(2026, 11, 23, tzinfo=UTC), "naive is UTC"
    with pytest.raises(ValueError, match="neither a duration ago"):
        parse_time("0s")
