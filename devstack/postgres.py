"""A throwaway PostgreSQL cluster: initdb into a directory, serve on a loopback port."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql

from devstack.ports import LOOPBACK, free_port
from devstack.process import DevstackError, LocalServer, ManagedProcess, startup_error

SUPERUSER = "postgres"
_SOCKET_NAME = ".s.PGSQL.65535"
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# Durability off: a crashed test cluster is thrown away, not recovered.
_SETTINGS = {
    "listen_addresses": LOOPBACK,
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "64MB",
    "timezone": "UTC",
}


def find_bindir() -> Path:
    """The directory holding initdb and postgres: `pg_config --bindir`, the newest
    /usr/lib/postgresql/*/bin (Debian), or wherever initdb is on PATH."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    versions = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    candidates += sorted(versions, key=lambda p: int(p.parent.name), reverse=True)
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(Path(initdb).parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise DevstackError(
        "could not start postgresql: no initdb/postgres binaries found (looked at "
        "pg_config --bindir, /usr/lib/postgresql/*/bin and PATH); install the `postgresql` "
        "package (scripts/bootstrap does)"
    )


class PostgresCluster(LocalServer):
    """A private PostgreSQL cluster with trust auth for `postgres` on 127.0.0.1.

    As root, PostgreSQL refuses to run, so the cluster belongs to the `postgres` OS user;
    when that user cannot reach `directory` (e.g. under a 0700 pytest temp root) the
    cluster lives in a fresh /tmp directory instead, removed again by stop().
    """

    name = "postgresql"

    def __init__(self, directory: Path, *, bindir: Path | None = None, timeout: float = 60.0):
        super().__init__()
        self.directory = Path(directory).absolute()
        self.bindir = bindir
        self.timeout = timeout
        self.port = 0
        self.data_dir = self.directory / "pgdata"
        self.os_user: str | None = None
        self._scratch: Path | None = None
        self._process: ManagedProcess | None = None
        self._last_error = ""

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq URL for psycopg."""
        return f"postgresql://{SUPERUSER}@{LOOPBACK}:{self.port}/{dbname}"

    def url(self, dbname: str = "postgres") -> str:
        """A SQLAlchemy URL (psycopg 3 driver)."""
        return f"postgresql+psycopg://{SUPERUSER}@{LOOPBACK}:{self.port}/{dbname}"

    def create_database(self, name: str, template: str = "template1") -> str:
        """Creates database `name` (lower-case identifier) and returns its name."""
        if not _NAME.match(name) or not _NAME.match(template):
            raise ValueError(f"not a plain lower-case database name: {name!r}")
        query = sql.SQL("CREATE DATABASE {} TEMPLATE {}")
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(query.format(sql.Identifier(name), sql.Identifier(template)))
        return name

    def drop_database(self, name: str) -> None:
        if not _NAME.match(name):
            raise ValueError(f"not a plain lower-case database name: {name!r}")
        query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(query.format(sql.Identifier(name)))

    def _start(self) -> None:
        bindir = self.bindir or find_bindir()
        self.directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self.os_user = SUPERUSER
            self._prepare_for_postgres_user()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(bindir)
        self.port = free_port()
        socket_dir = str(self.data_dir)
        if len(socket_dir) + len(_SOCKET_NAME) + 1 > 107:
            socket_dir = ""  # TCP only; the unix socket path would be too long
        argv = [str(bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        argv += ["-k", socket_dir]
        for key, value in _SETTINGS.items():
            argv += ["-c", f"{key}={value}"]
        self._process = ManagedProcess(
            self.name,
            argv,
            log_path=self.directory / "postgres.log",
            cwd=self.data_dir,
            user=self.os_user,
            stop_signal=signal.SIGINT,  # "fast" shutdown: rolls back and disconnects clients
            stop_timeout=20.0,
        )
        self._process.start()
        self._process.wait_ready(
            self._accepts_queries, self.timeout, "a SELECT 1", last_error=lambda: self._last_error
        )

    def _prepare_for_postgres_user(self) -> None:
        try:
            account = pwd.getpwnam(SUPERUSER)
        except KeyError as exc:
            raise DevstackError(
                "could not start postgresql: running as root, but there is no `postgres` OS "
                "user to own the cluster (the Debian `postgresql` package creates it)"
            ) from exc
        self.data_dir.mkdir(exist_ok=True)
        os.chown(self.data_dir, account.pw_uid, account.pw_gid)
        self.data_dir.chmod(0o700)
        reachable = subprocess.run(
            ["test", "-w", str(self.data_dir)], user=SUPERUSER, check=False
        ).returncode
        if reachable != 0:
            self.data_dir.rmdir()
            self._scratch = Path(tempfile.mkdtemp(prefix="gpuplane-pg-"))
            os.chown(self._scratch, account.pw_uid, account.pw_gid)
            self.data_dir = self._scratch
            (self.directory / "pgdata.location").write_text(f"{self._scratch}\n")

    def _initdb(self, bindir: Path) -> None:
        log = self.directory / "initdb.log"
        argv = [str(bindir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER]
        argv += ["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"]
        with log.open("wb") as out:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                user=self.os_user,
                cwd="/",
                check=False,
                timeout=120,
            )
        if done.returncode != 0:
            raise startup_error(self.name, f"initdb exited with code {done.returncode}", log)

    def _accepts_queries(self) -> bool:
        try:
            with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            self._last_error = str(exc).strip()
            return False
        return True

    def _stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None
        if self._scratch is not None:
            _remove_in_background(self._scratch)
            self._scratch = None
            self.data_dir = self.directory / "pgdata"


def _remove_in_background(path: Path) -> None:
    """Removes a stopped cluster's directory without waiting: with the hundreds of databases
    a test session makes, removing them took 11.5 s of the session's end. The directory is
    renamed first, so nothing finds it meanwhile; where `rm` cannot start, removed here."""
    doomed = path.with_name(f"{path.name}.removing")
    try:
        path.rename(doomed)
        subprocess.Popen(
            ["rm", "-rf", "--", str(doomed)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not the caller's child to wait for, nor its signals
        )
    except OSError:
        shutil.rmtree(doomed if doomed.exists() else path, ignore_errors=True)
