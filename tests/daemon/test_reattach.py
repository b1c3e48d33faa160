"""Re-attach after a daemon restart, against the real control plane (in process), NATS, S3 and
Docker: the job finishes on the same container and is charged once; orphans are removed;
attempts whose container vanished are reported; a resync reconciles the same way, and answers
for the one attempt it asks about."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import docker
import nats
import pytest
from docker.models.containers import Container
from gpuplane.v1 import jobs_pb2, ledger_pb2, messaging_pb2, registry_pb2, types_pb2
from nats.aio.msg import Msg

from daemon import reattach
from daemon.agent import Agent
from daemon.journal import JournalEntry
from daemon.progress import Progress
from daemon.runtime import LABEL_ATTEMPT, LABEL_HOST, LABEL_JOB
from devstack import DockerEngine, NatsServer, S3Server
from tests.daemon.test_agent import daemon_settings, fetch, wait_online
from tests.harness import JobPlane

S = types_pb2
K = messaging_pb2.JobReportKind
pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.docker,
    # The host stays online across the restart (a real one takes seconds, not 15).
    pytest.mark.plane(heartbeat_timeout_ms=6000),
]


def jobs_on_gpus(batch: registry_pb2.TelemetryBatch | None) -> set[str]:
    return {p.job_id for s in (batch.samples if batch else []) for p in s.processes}


def labelled(client: docker.DockerClient, job_id: str) -> list[Container]:
    return list(client.containers.list(all=True, filters={"label": f"{LABEL_JOB}={job_id}"}))


async def test_a_restarted_daemon_reattaches_and_the_job_is_charged_once(
    plane: JobPlane,
    tmp_path: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    test_image: str,
) -> None:
    token = await plane.token()
    settings = daemon_settings(plane, token, tmp_path / "daemon", s3_server, docker_engine)
    settings.telemetry_interval_ms = 200
    first = Agent(settings)
    await first.start()
    try:
        await wait_online(plane, first.host_id)
        # Runs until the test drops /output/go into its work dir: no sleeps to race.
        script = (
            "hostname > /output/host; echo started; "
            "until [ -f /output/go ]; do sleep 0.05; done; echo finished"
        )
        job = await plane.submit(
            image=test_image, command=["sh", "-c", script], gpu_count=1, max_duration_seconds=60
        )
        await plane.wait_for(job.job_id, [S.JOB_STATE_RUNNING])
        [container] = labelled(docker_client, job.job_id)
    finally:
        await first.stop()
    assert container.id is not None
    container.reload()
    assert container.status == "running"  # stopping the daemon left the job running

    restarted = time.monotonic()
    second = Agent(daemon_settings(plane, None, tmp_path / "daemon", s3_server, docker_engine))
    second.settings.telemetry_interval_ms = 200
    await second.start()
    try:
        async with asyncio.timeout(10):
            while not second.executors.get((job.job_id, 1), None) or not (
                second.executors[(job.job_id, 1)].container_id
            ):
                await asyncio.sleep(0.01)
        reattach_seconds = time.monotonic() - restarted
        print(f"\nre-attach: {reattach_seconds * 1000:.0f} ms from Agent() to adopted")
        assert second.reattached == [(job.job_id, 1)]
        assert second.executors[(job.job_id, 1)].container_id == container.id
        # Telemetry of the simulated GPU shows the adopted job on it.
        assert second.telemetry is not None
        async with asyncio.timeout(5):
            while job.job_id not in jobs_on_gpus(second.telemetry.latest):
                await asyncio.sleep(0.05)
        assert second.connect is not None
        assert second.connect.telemetry_sent > 0

        work = second.settings.attempt_dir(job.job_id, 1)
        (work / "output" / "go").write_text("")
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED])
    finally:
        await second.stop()
    assert done.state == S.JOB_STATE_SUCCEEDED, done.state_reason
    assert [a.attempt for a in done.attempts] == [1]
    assert labelled(docker_client, job.job_id) == []

    results = await plane.jobs.GetResults(
        jobs_pb2.GetResultsRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
    )
    urls = {o.path: o.url for o in results.objects}
    host = (await asyncio.to_thread(fetch, urls["output/host"])).decode().strip()
    assert container.id.startswith(host)  # the very container that was started first
    assert await asyncio.to_thread(fetch, urls["logs/stdout"]) == b"started\nfinished\n"

    entries = await plane.ledger.ListEntries(
        ledger_pb2.ListEntriesRequest(tenant_id=plane.consumer_tenant, job_id=job.job_id),
        metadata=plane.auth(),
    )
    charges = [e for e in entries.entries if e.kind == S.TRANSFER_KIND_CHARGE]
    assert len(charges) == 1
    assert {e.attempt for e in charges} == {1}
    assert done.charged_micro_credits == done.attempts[0].charged_micro_credits > 0
    await plane.assert_ledger_consistent()


async def test_execs_left_by_a_dead_daemon_are_hung_up_when_it_adopts_their_container(
    plane: JobPlane,
    tmp_path: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    test_image: str,
) -> None:
    """A daemon that died took its execs' client connections with it, and Docker cannot attach
    to an exec again: the next run hangs up what still runs in the containers it adopts, as
    a client going away would (a terminal's at once, others after end-of-file and the
    grace), and leaves the job and what an exec started in a session of its own running."""
    token = await plane.token()
    first = Agent(daemon_settings(plane, token, tmp_path / "daemon", s3_server, docker_engine))
    await first.start()
    try:
        await wait_online(plane, first.host_id)
        job = await plane.submit(
            image=test_image, command=["sleep", "300"], gpu_count=1, max_duration_seconds=120
        )
        await plane.wait_for(job.job_id, [S.JOB_STATE_RUNNING])
        [container] = labelled(docker_client, job.job_id)
    finally:
        await first.stop()
    api = docker_client.api
    assert container.id is not None

    def left(command: str, tty: bool) -> str:
        """An exec running when its daemon died (started here, detached: no client left)."""
        exec_id = api.exec_create(container.id, ["sh", "-c", command], tty=tty, stdin=True)
        api.exec_start(exec_id["Id"], detach=True, tty=tty)
        return str(exec_id["Id"])

    shell = left("setsid sleep 305 & sleep 303", tty=True)
    plain = left("sleep 304", tty=False)
    async with asyncio.timeout(10):
        while not all(api.exec_inspect(e)["Running"] for e in (shell, plain)):
            await asyncio.sleep(0.05)
    assert "sleep 305" in ps(container)

    second = Agent(daemon_settings(plane, None, tmp_path / "daemon", s3_server, docker_engine))
    await second.start()
    try:
        async with asyncio.timeout(10):
            while (job.job_id, 1) not in second.reattached:
                await asyncio.sleep(0.02)
        adopted = time.monotonic()
        async with asyncio.timeout(4):  # the terminal's: SIGHUP at once
            while api.exec_inspect(shell)["Running"]:
                await asyncio.sleep(0.05)
        assert api.exec_inspect(plain)["Running"]  # no terminal: it has the grace first
        async with asyncio.timeout(15):
            while api.exec_inspect(plain)["Running"]:
                await asyncio.sleep(0.1)
        assert time.monotonic() - adopted >= 4.0
        async with asyncio.timeout(5):
            while second.left_execs_ended != 2:
                await asyncio.sleep(0.05)
        assert "sleep 305" in ps(container)  # its own session: left running
        assert (await plane.get(job.job_id)).state == S.JOB_STATE_RUNNING
        container.reload()
        assert container.status == "running"
        request = jobs_pb2.CancelJobRequest(job_id=job.job_id)
        await plane.jobs.CancelJob(request, metadata=plane.auth(plane.consumer_key))
        await plane.wait_for(job.job_id, [S.JOB_STATE_CANCELLED])
    finally:
        await second.stop()


def ps(container: Container) -> str:
    """The container's processes' command lines."""
    return str(container.top(ps_args="-o pid,args")["Processes"])


def leave_orphan(
    agent: Agent, client: docker.DockerClient, image: str, job_id: str, host_id: str
) -> Container:
    """A running container with this host's labels, a journal entry and a work dir for it,
    for an attempt the control plane never heard of."""
    dispatch = messaging_pb2.DispatchMessage(job_id=job_id, attempt=1)
    agent.journal.write(
        JournalEntry(
            job_id,
            1,
            last_seq=2,
            dispatch_b64=base64.b64encode(dispatch.SerializeToString()).decode(),
        )
    )
    agent.settings.attempt_dir(job_id, 1).mkdir(parents=True)
    labels = {LABEL_JOB: job_id, LABEL_ATTEMPT: "1", LABEL_HOST: host_id}
    return client.containers.run(image, ["sleep", "60"], labels=labels, detach=True)


async def test_orphans_go_and_vanished_attempts_are_reported(
    plane: JobPlane,
    tmp_path: Path,
    nats_server: NatsServer,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    test_image: str,
) -> None:
    token = await plane.token()
    settings = daemon_settings(plane, token, tmp_path / "daemon", s3_server, docker_engine)
    first = Agent(settings)
    await first.start()
    await first.stop()
    host_id = first.host_id
    leave_orphan(first, docker_client, test_image, "job-orphan", host_id)
    first.journal.write(JournalEntry("job-vanished", 2, last_seq=3, state=Progress.RUNNING))
    settings.attempt_dir("job-vanished", 2).mkdir(parents=True)

    client = await nats.connect(nats_server.url)
    reports: list[messaging_pb2.JobReport] = []

    async def collect(message: Msg) -> None:
        reports.append(messaging_pb2.JobReport.FromString(message.data))

    await client.subscribe("gpuplane.events.*.job-vanished", cb=collect)
    second = Agent(daemon_settings(plane, None, tmp_path / "daemon", s3_server, docker_engine))
    try:
        await second.start()
        async with asyncio.timeout(10):
            while labelled(docker_client, "job-orphan") or not reports:
                await asyncio.sleep(0.05)
        assert second.orphans_removed == 1
        assert second.reattached == []
        assert second.journal.entries() == []
        assert second.leftovers == {}
        assert not settings.attempt_dir("job-orphan", 1).exists()
        assert not settings.attempt_dir("job-vanished", 2).exists()
        [stopped] = reports
        assert (stopped.job_id, stopped.attempt, stopped.seq) == ("job-vanished", 2, 4)
        assert stopped.kind == K.JOB_REPORT_KIND_STOPPED
        assert stopped.stop_reason == messaging_pb2.StopReason.STOP_REASON_DAEMON_RESTARTED

        # A resync reconciles the same way: a new orphan goes; a running attempt taken
        # moments ago is not stopped (the listing may predate it).
        late = leave_orphan(second, docker_client, test_image, "job-orphan-2", host_id)
        await second.on_command(
            registry_pb2.ControlMessage(resync=registry_pb2.ResyncCommand(known_jobs=[]))
        )
        assert labelled(docker_client, "job-orphan-2") == []
        assert second.orphans_removed == 2
        assert late.id not in {c.id for c in docker_client.containers.list(all=True, sparse=True)}

        # A resync asking about one attempt: one this daemon never took is "not running
        # here" (and never run later); one that ended here was run.
        def missing(job_id: str, attempt: int) -> registry_pb2.ControlMessage:
            gone = registry_pb2.RunningJob(job_id=job_id, attempt=attempt)
            resync = registry_pb2.ResyncCommand(known_jobs=[gone], missing=gone)
            return registry_pb2.ControlMessage(resync=resync, command_id=9)

        answer = await second.on_command(missing("job-never", 1))
        assert answer == registry_pb2.COMMAND_ANSWER_NOT_RUNNING_HERE
        assert ("job-never", 1) in second._ended
        answer = await second.on_command(missing("job-vanished", 2))
        assert answer == registry_pb2.COMMAND_ANSWER_APPLIED
    finally:
        await client.close()
        await second.stop()
        for job_id in ("job-orphan", "job-orphan-2"):
            for container in labelled(docker_client, job_id):
                container.remove(force=True)


def test_plan_decides_per_container() -> None:
    def container(job: str, attempt: str = "1") -> Container:
        labels = {LABEL_JOB: job, LABEL_ATTEMPT: attempt}
        return Container(attrs={"Id": job, "Config": {"Labels": labels}})

    dispatch = base64.b64encode(messaging_pb2.DispatchMessage(job_id="a").SerializeToString())
    leftovers = {
        ("adopt", 1): JournalEntry("adopt", 1, dispatch_b64=dispatch.decode()),
        ("unknown", 1): JournalEntry("unknown", 1, dispatch_b64=dispatch.decode()),
        ("gone", 1): JournalEntry("gone", 1),
    }
    containers = [
        container("adopt"),
        container("unknown"),
        container("running"),
        container("nojournal"),
        container("ended"),
        container("bad", "x"),
    ]
    known = {("adopt", 1), ("running", 1), ("nojournal", 1), ("ended", 1)}
    decided = reattach.plan(
        containers, known=known, leftovers=leftovers, running={("running", 1)}, ended={("ended", 1)}
    )
    assert [(e.job_id, c.id) for e, c in decided.adopt] == [("adopt", "adopt")]
    assert [c.id for c in decided.orphans] == ["unknown", "bad"]
    assert [k for k, _ in decided.unresumable] == [("nojournal", 1)]
    assert [c.id for c in decided.stray] == ["ended"]
    assert reattach.vanished(leftovers, containers) == [("gone", 1)]
    taken = {("old", 1): 1.0, ("new", 1): 5.0, ("listed", 1): 1.0}
    assert reattach.unlisted(taken, {("listed", 1)}, listed_after=3.0) == [("old", 1)]
