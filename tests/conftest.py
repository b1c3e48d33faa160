"""Session fixtures: real local servers (NATS, S3, PostgreSQL, Docker) started on first use;
and `plane`, the harness's control plane (tests/harness.py) for one test."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import re
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import docker
import nats
import pytest
from nats.js import JetStreamContext

from controlplane.db.engine import Database
from daemon.runtime import LABEL_JOB
from devstack import (
    TEST_IMAGE,
    DockerEngine,
    NatsServer,
    NatsTls,
    PostgresCluster,
    S3Server,
    build_test_image,
)
from devstack.certs import TestCerts, issue_test_certs
from devstack.docker_engine import remove_containers
from messaging.subjects import ensure_streams
from storage.objects import ObjectStore
from tests.dbseed import migrated_database
from tests.harness import JobPlane, job_plane
from tests.serving import STOPS, serve, start_or_message


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A CI job killed with SIGTERM would otherwise leave the servers running: as
    # KeyboardInterrupt, pytest stops and runs the fixtures' teardown.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    config.addinivalue_line(
        "markers", "databases(*kinds): run each test on these databases (sqlite, postgresql)"
    )
    config.addinivalue_line(
        "markers", "plane(**settings): Settings overrides for the `plane` fixture's control plane"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How long the servers fixtures started took to stop, slowest first (the session's stop
    in the last test's teardown, which --durations shows as one figure)."""
    slow = sorted(((took, name) for name, took in STOPS if took >= 1.0), reverse=True)
    if slow:
        total = sum(took for took, _ in slow)
        terminalreporter.write_sep(
            "-", f"{len(slow)} server stops slower than 1 s, {total:.1f}s in all (slowest 10)"
        )
        for took, name in slow[:10]:
            terminalreporter.write_line(f"{took:6.2f}s {name}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("databases")
    if marker is not None and "database_url" in metafunc.fixturenames:
        metafunc.parametrize("database_url", marker.args, indirect=True)


_databases = itertools.count()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """nats-server with JetStream; connect to `.url`."""
    yield from serve(NatsServer(tmp_path_factory.mktemp("nats")))


@pytest.fixture(scope="session")
def test_certs(tmp_path_factory: pytest.TempPathFactory) -> TestCerts:
    """A CA with a server certificate for localhost/127.0.0.1 and a client certificate."""
    return issue_test_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def nats_tls_server(
    tmp_path_factory: pytest.TempPathFactory, test_certs: TestCerts
) -> Iterator[NatsServer]:
    """nats-server with JetStream requiring TLS and a client certificate signed by
    test_certs' CA; `.url` is tls://."""
    tls = NatsTls(test_certs.server_cert, test_certs.server_key, ca_file=test_certs.ca_cert)
    yield from serve(NatsServer(tmp_path_factory.mktemp("nats-tls"), tls=tls))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """An S3 server; `.endpoint`, `.access_key`, `.secret_key`, `.client()`."""
    yield from serve(S3Server(tmp_path_factory.mktemp("s3")))


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster; `.create_database(name)`, `.url(name)`, `.dsn(name)`."""
    yield from serve(PostgresCluster(tmp_path_factory.mktemp("postgres")))


def _database_name(request: pytest.FixtureRequest) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:40]
    return f"t{next(_databases)}_{slug}"


@pytest.fixture
def pg_url(postgres: PostgresCluster, request: pytest.FixtureRequest) -> str:
    """A SQLAlchemy URL (postgresql+psycopg://) of a fresh, empty database for this test."""
    return postgres.url(postgres.create_database(_database_name(request)))


@pytest.fixture
async def db(postgres: PostgresCluster, request: pytest.FixtureRequest) -> AsyncIterator[Database]:
    """A migrated PostgreSQL database of this test's own (a copy of one migrated once)."""
    url = await asyncio.to_thread(migrated_database, postgres, _database_name(request))
    database = Database(url)
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
async def jetstream(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    """A JetStream context on the session NATS server, with the control plane's streams."""
    client = await nats.connect(nats_server.url)
    js = client.jetstream()
    await ensure_streams(js)
    try:
        yield js
    finally:
        await client.close()


@pytest.fixture
async def store(s3_server: S3Server) -> ObjectStore:
    """An ObjectStore on the session S3 server, with a fresh bucket for this test."""
    object_store = ObjectStore(
        s3_server.endpoint,
        s3_server.access_key,
        s3_server.secret_key,
        bucket=f"t-{uuid.uuid4().hex[:12]}",
    )
    await object_store.ensure_bucket()
    return object_store


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> str:
    """The control plane's database: "" (SQLite in its data dir) unless the test is marked
    `databases(...)`, which runs it once per kind, PostgreSQL on a fresh database: empty, or
    for a test with a `plane`, a copy of one migrated once (tests/dbseed.py)."""
    kind = getattr(request, "param", "sqlite")
    if kind == "sqlite":
        return ""
    if "plane" in request.fixturenames:  # a harness plane: start from a migrated copy
        postgres: PostgresCluster = request.getfixturevalue("postgres")
        return migrated_database(postgres, _database_name(request))
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def plane(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    nats_server: NatsServer,
    s3_server: S3Server,
    database_url: str,
) -> AsyncIterator[JobPlane]:
    """A control plane of this test's own (harness.job_plane) on real NATS and S3, with a
    funded consumer and a provider; a `plane(**settings)` marker overrides its settings."""
    marker = request.node.get_closest_marker("plane")
    overrides = dict(marker.kwargs) if marker is not None else {}

    def configure(options: dict[str, Any]) -> None:
        options.update(overrides)

    async with job_plane(
        tmp_path / "cp", nats_server.url, s3_server, database_url, configure=configure
    ) as running:
        yield running


# The session's engine once a test asked for it (module teardown looks, never starts it).
_engines: list[DockerEngine] = []


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    """A Docker engine: a private dockerd with a stand-in NVIDIA hook when root."""
    engine = DockerEngine(tmp_path_factory.mktemp("docker"))
    _engines.append(engine)
    try:
        yield from serve(engine)
    finally:
        _engines.remove(engine)


@pytest.fixture(scope="module", autouse=True)
def _no_workload_outlives_its_module() -> Iterator[None]:
    """After each module, the workload containers its daemons left behind (a stopped daemon
    leaves them for its next start to adopt) are removed: no later test needs them, and each
    kept a core busy or a daemon thread of this process waiting on it (container waits, log
    follows) for the rest of the suite."""
    yield
    for engine in _engines:
        client = engine.client()
        try:
            remove_containers(client, LABEL_JOB)
        finally:
            client.close()


@pytest.fixture(scope="session")
def docker_client(docker_engine: DockerEngine) -> Iterator[docker.DockerClient]:
    client = docker_engine.client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def test_image(docker_client: docker.DockerClient) -> str:
    """The tag of a local busybox image (sh, echo, cat, env, ...; /input and /output)."""
    problem = start_or_message(lambda: build_test_image(docker_client, TEST_IMAGE))
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    return TEST_IMAGE


def nvml_header() -> Path | None:
    """nvml.h from the nvidia-nvml-dev wheel (namespace package `nvidia`)."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for header in Path(root).glob("*/include/nvml.h"):
            return header
    return None


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the fake libnvidia-ml.so.1 built from tests/daemon/fake_nvml.c (put
    it on LD_LIBRARY_PATH of a child: the loader reads that variable only at process start)."""
    header = nvml_header()
    compiler = shutil.which("cc") or shutil.which("gcc")
    if header is None or compiler is None:
        pytest.fail("needs a C compiler and nvml.h (pip install nvidia-nvml-dev)", pytrace=False)
    out = tmp_path_factory.mktemp("fake-nvml")
    subprocess.run(
        [
            compiler,
            "-shared",
            "-fPIC",
            "-O2",
            "-pthread",
            "-Wl,-soname,libnvidia-ml.so.1",
            f"-I{header.parent}",
            str(Path(__file__).parent / "daemon" / "fake_nvml.c"),
            "-o",
            str(out / "libnvidia-ml.so.1"),
        ],
        check=True,
        capture_output=True,
    )
    return out
