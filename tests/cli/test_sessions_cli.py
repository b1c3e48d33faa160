"""`gpuplane sessions …` and `gpuplane ssh-config` against a served control plane (no host:
sessions stay queued): --hours out of range is named as --hours, a bad key file as --ssh-key,
short session ids resolve (also where a job id is taken), the ssh entry proxies through
`gpuplane port-forward --stdio`, and a shell completes session ids."""

from __future__ import annotations

from pathlib import Path

import pytest
from gpuplane.v1 import sessions_pb2, sessions_pb2_grpc, types_pb2

from tests.cli.conftest import Cli, Served
from tests.cli.test_completion import complete_in, distinguishing_prefix, environment
from tests.cli.test_short_ids import funded_consumer
from tests.harness import JobPlane

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEnyiHyW0lHc+ZtFDYeGfnWCTZh2Hp3ojQ0Q0aFxT4pW me@laptop"
CREATE = ("sessions", "create", "--image", "busybox", "--max-price", "1")


def test_sessions_end_to_end_through_the_cli(cli: Cli, served: Served, tmp_path: Path) -> None:
    _, key = funded_consumer(cli, served)
    for hours in ("0", "13"):
        refused = cli(*CREATE, "--hours", hours, key=key)
        assert refused.code == 2, refused.err
        assert refused.err.startswith("error: INVALID_ARGUMENT: --hours: "), refused.err
    with pytest.raises(SystemExit) as usage:  # argparse: not a number of hours
        cli(*CREATE, "--hours", "-1", key=key)
    assert usage.value.code == 2
    bad = tmp_path / "bad.pub"
    bad.write_text("ssh-dss AAAA\n")
    refused = cli(*CREATE, "--hours", "1", "--ssh-key", str(bad), key=key)
    assert refused.err.startswith("error: INVALID_ARGUMENT: --ssh-key (#1): "), refused.err

    public = tmp_path / "id_ed25519.pub"
    public.write_text(KEY + "\n")
    made = cli("--json", *CREATE, "--hours", "0.5", "--ssh-key", str(public), key=key)
    assert made.code == 0, made.err
    shown = made.json()
    assert isinstance(shown, dict)
    session_id = shown["session_id"]
    assert session_id.startswith("ses_")
    assert shown["duration_seconds"] == "1800"  # uint64 in JSON: a string
    assert shown["ssh_public_keys"] == [KEY]

    short = session_id[4:12]
    got = cli("--json", "sessions", "get", short, key=key)
    assert got.code == 0, got.err
    assert got.json()["session_id"] == session_id  # type: ignore[index]
    for given in (session_id[:12], short):  # a session is a job: `jobs get` finds it too
        as_job = cli("--json", "jobs", "get", given, key=key)
        assert as_job.code == 0, as_job.err
        assert as_job.json()["job_id"] == session_id  # type: ignore[index]

    listed = cli("sessions", "list", key=key)
    assert listed.code == 0
    assert listed.out.splitlines()[0].split() == [
        "SESSION", "STATE", "IMAGE", "GPUS", "HOST", "EXPIRES", "CHARGED"
    ]  # fmt: skip
    assert session_id in listed.out

    extended = cli("--json", "sessions", "extend", short, "--hours", "1", key=key)
    assert extended.code == 0, extended.err
    assert extended.json()["duration_seconds"] == "5400"  # type: ignore[index]
    too_long = cli("sessions", "extend", short, "--hours", "11", key=key)
    assert too_long.code == 2
    assert too_long.err.startswith("error: INVALID_ARGUMENT: --hours: "), too_long.err

    entry = cli("ssh-config", short, "--ssh-key", str(public), key=key)
    assert entry.code == 0, entry.err
    lines = [line.strip() for line in entry.out.splitlines()]
    assert lines[0] == f"Host gpuplane-{short}"
    assert f"ProxyCommand gpuplane port-forward --stdio {session_id} 22" in lines
    assert "User root" in lines
    assert "StrictHostKeyChecking accept-new" in lines
    assert f"IdentityFile {tmp_path / 'id_ed25519'}" in lines

    done = cli("sessions", "done", short, key=key)
    assert done.code == 0, done.err
    assert "CANCELLED" in done.out  # queued: it never ran
    assert cli("sessions", "destroy", short, key=key).code == 0  # already over: no change

    _, other = funded_consumer(cli, served)
    hidden = cli("sessions", "get", session_id, key=other)
    assert hidden.code == 3
    assert "NOT_FOUND" in hidden.err


async def test_bash_completes_session_ids(plane: JobPlane) -> None:
    stub = sessions_pb2_grpc.SessionServiceStub(plane.channel)
    spec = types_pb2.JobSpec(image="busybox", gpu_count=1, max_price_per_gpu_hour_micro_credits=1)
    made = [
        await stub.CreateSession(
            sessions_pb2.CreateSessionRequest(spec=spec, duration_seconds=600),
            metadata=plane.auth(plane.consumer_key),
        )
        for _ in range(2)
    ]
    first, second = (m.session.session_id for m in made)
    env = environment(plane.address, plane.consumer_key)
    lines = [
        f"gpuplane sessions get {distinguishing_prefix(first, second)}",
        f"gpuplane sessions done {distinguishing_prefix(second, first)}",
        f"gpuplane ssh-config {distinguishing_prefix(first, second)}",
    ]
    assert await complete_in("bash", env, *lines) == [[first], [second], [first]]
