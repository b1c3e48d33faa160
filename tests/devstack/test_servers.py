"""The test harness's servers really serve: JetStream, PostgreSQL, S3 and Docker round trips."""

from __future__ import annotations

import hashlib
import io
import os
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import docker
import nats
import psycopg
import pytest
from docker.types import DeviceRequest
from minio import Minio
from minio.error import S3Error
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from devstack import DevstackError, DockerEngine, NatsServer, S3Server


async def test_jetstream_publish_acks_and_dedups_by_msg_id(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="DEVSTACK", subjects=["devstack.>"])
        first = await js.publish("devstack.a", b"one", headers={"Nats-Msg-Id": "job-1.1"})
        again = await js.publish("devstack.a", b"one", headers={"Nats-Msg-Id": "job-1.1"})
        other = await js.publish("devstack.a", b"two", headers={"Nats-Msg-Id": "job-1.2"})
        assert (first.stream, first.seq, bool(first.duplicate)) == ("DEVSTACK", 1, False)
        assert again.duplicate is True
        assert again.seq == 1
        assert other.seq == 2
        info = await js.stream_info("DEVSTACK")
        assert info.state.messages == 2

        sub = await js.pull_subscribe("devstack.a", durable="reader")
        messages = await sub.fetch(2, timeout=5)
        assert [m.data for m in messages] == [b"one", b"two"]
        for message in messages:
            await message.ack()
    finally:
        await nc.drain()


def test_postgres_transaction_commits_and_rolls_back(pg_url: str) -> None:
    engine = create_engine(pg_url)
    try:
        assert inspect(engine).get_table_names() == []  # a fresh database per test
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)"))
            conn.execute(text("INSERT INTO items VALUES (1, 'kept')"))
        with engine.connect() as conn:
            transaction = conn.begin()
            conn.execute(text("INSERT INTO items VALUES (2, 'rolled back')"))
            transaction.rollback()
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, name FROM items ORDER BY id")).all()
        assert [tuple(row) for row in rows] == [(1, "kept")]
    finally:
        engine.dispose()


async def test_postgres_url_works_with_asyncio(pg_url: str) -> None:
    engine = create_async_engine(pg_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE items (id int PRIMARY KEY)"))
            await conn.execute(text("INSERT INTO items VALUES (7)"))
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT id FROM items"))).scalar_one() == 7
            fsync = (await conn.execute(text("SHOW fsync"))).scalar_one()
        assert fsync == "off"
    finally:
        await engine.dispose()


def test_s3_roundtrip_and_presigned_get(s3_server: S3Server) -> None:
    client = s3_server.client()
    client.make_bucket("roundtrip")
    payload = os.urandom(3 * 1024 * 1024 + 17)
    client.put_object("roundtrip", "dir/blob.bin", io.BytesIO(payload), len(payload))

    response = client.get_object("roundtrip", "dir/blob.bin")
    try:
        fetched = response.read()
    finally:
        response.close()
        response.release_conn()
    assert hashlib.sha256(fetched).hexdigest() == hashlib.sha256(payload).hexdigest()

    url = client.presigned_get_object("roundtrip", "dir/blob.bin", expires=timedelta(minutes=5))
    assert url.startswith(f"http://{s3_server.endpoint}/")
    with urllib.request.urlopen(url, timeout=30) as presigned:
        assert hashlib.sha256(presigned.read()).digest() == hashlib.sha256(payload).digest()


def test_s3_rejects_a_wrong_secret(s3_server: S3Server) -> None:
    intruder = Minio(s3_server.endpoint, s3_server.access_key, "not-the-secret", secure=False)
    with pytest.raises(S3Error, match="SignatureDoesNotMatch"):
        intruder.list_buckets()


def test_two_s3_servers_run_side_by_side(s3_server: S3Server, tmp_path: Path) -> None:
    with S3Server(tmp_path / "second", buckets=["only-here"]) as second:
        assert second.ports.keys() == s3_server.ports.keys()
        assert not set(second.ports.values()) & set(s3_server.ports.values())
        assert [b.name for b in second.client().list_buckets()] == ["only-here"]
        assert "only-here" not in [b.name for b in s3_server.client().list_buckets()]


def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    server = NatsServer(tmp_path, binary="/bin/false")
    with pytest.raises(DevstackError, match=r"could not start nats-server: it exited with code 1"):
        server.start()
    assert not server.started


def test_a_relative_directory_is_anchored_where_it_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with NatsServer(Path("rel")) as server:
        assert server.directory == tmp_path / "rel"
        assert (tmp_path / "rel" / "jetstream").is_dir()
        assert (tmp_path / "rel" / "nats-server.log").is_file()


def test_docker_runs_the_test_image(docker_client: docker.DockerClient, test_image: str) -> None:
    output = docker_client.containers.run(
        test_image,
        ["sh", "-c", "echo hello from $(id -u); ls -d /input /output"],
        network_mode="none",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        remove=True,
    )
    assert output == b"hello from 0\n/input\n/output\n"


def test_gpu_device_request_reaches_the_engine(
    docker_engine: DockerEngine, docker_client: docker.DockerClient, test_image: str
) -> None:
    uuids = ["GPU-11111111-2222-3333-4444-555555555555", "GPU-66666666-7777-8888-9999-000000000000"]
    container = docker_client.containers.create(
        test_image,
        ["sh", "-c", "echo NVIDIA_VISIBLE_DEVICES=$NVIDIA_VISIBLE_DEVICES"],
        network_mode="none",
        cap_drop=["ALL"],
        device_requests=[DeviceRequest(device_ids=uuids, capabilities=[["gpu"]])],
    )
    try:
        container.reload()
        requests = container.attrs["HostConfig"]["DeviceRequests"]
        assert [r["DeviceIDs"] for r in requests] == [uuids]
        assert [r["Capabilities"] for r in requests] == [[["gpu"]]]
        if docker_engine.hook_log is None:
            return  # a host engine: whether it can start GPU containers is its own business
        container.start()
        assert container.wait(timeout=60)["StatusCode"] == 0
        assert container.logs() == f"NVIDIA_VISIBLE_DEVICES={','.join(uuids)}\n".encode()
        calls = [c for c in docker_engine.hook_calls() if c.state.get("id") == container.id]
        assert [c.argv for c in calls] == [["prestart"]]
    finally:
        container.remove(force=True)


def test_private_engine_networks_in_its_own_namespace(
    docker_engine: DockerEngine, docker_client: docker.DockerClient, test_image: str
) -> None:
    if docker_engine.pid is None:
        return  # a host engine: its networking is the host's business
    own = os.stat("/proc/self/ns/net").st_ino
    assert os.stat(f"/proc/{docker_engine.pid}/ns/net").st_ino != own
    output = docker_client.containers.run(
        test_image, ["sh", "-c", "ip -4 -o addr show eth0"], remove=True
    )
    assert b" inet " in output  # the default bridge works, inside the engine's namespace


def test_a_host_engine_is_used_as_is_and_left_running(
    docker_engine: DockerEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", docker_engine.base_url)
    with DockerEngine(tmp_path, private=False) as host:
        assert host.base_url == docker_engine.base_url
        assert host.pid is None
        assert host.hook_log is None
    assert docker_engine.client().ping()

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/nothing.sock")
    with pytest.raises(DevstackError, match="does not answer"):
        DockerEngine(tmp_path, private=False).start()


def test_a_cluster_in_a_scratch_directory_leaves_nothing_once_stopped(tmp_path: Path) -> None:
    """Under a directory the `postgres` user cannot enter (pytest's 0700 temp root, as root)
    the cluster lives in a scratch directory; stop() hands its removal to a background `rm`
    (hundreds of databases took 11.5 s at the end of a session) and it is gone soon after."""
    from devstack import PostgresCluster

    cluster = PostgresCluster(tmp_path / "pg")
    cluster.start()
    try:
        scratch = cluster.data_dir
        if os.geteuid() == 0:
            assert scratch.parent != tmp_path / "pg", "as root the cluster uses scratch"
        with psycopg.connect(cluster.dsn()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        cluster.stop()
    if scratch.parent == tmp_path / "pg":
        return  # not root: the cluster lived under tmp_path, which pytest removes
    assert not scratch.exists()  # renamed at once
    doomed = scratch.with_name(f"{scratch.name}.removing")
    deadline = time.monotonic() + 30
    while doomed.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not doomed.exists()
