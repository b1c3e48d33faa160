"""Migrated databases for test planes: migrations run once per test process, not per plane.

A plane of the harness on SQLite starts from a copy of a database file migrated once; on
PostgreSQL (`migrated_database`) from `CREATE DATABASE … TEMPLATE` a database migrated
once. The control plane still runs `migrate.upgrade` at start, which finds the schema at
head. The migrations themselves are tested from an empty database by
tests/controlplane/test_migrations.py and test_migration_*.py, which do not use these."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path

from controlplane.db import migrate
from devstack.postgres import PostgresCluster

_lock = threading.Lock()
_sqlite_template: Path | None = None
_pg_templates: dict[str, str] = {}
PG_TEMPLATE = "gpuplane_migrated_template"


def seed_sqlite(data_dir: Path) -> None:
    """Puts a database at head into `data_dir` (where the control plane keeps its SQLite
    file), unless one is there already."""
    global _sqlite_template
    target = data_dir / "gpuplane.db"
    if target.exists():
        return
    with _lock:
        if _sqlite_template is None:
            directory = Path(tempfile.mkdtemp(prefix="gpuplane-db-template-"))
            atexit.register(shutil.rmtree, directory, True)
            path = directory / "gpuplane.db"
            migrate.upgrade(f"sqlite+aiosqlite:///{path}")
            _sqlite_template = path
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_sqlite_template, target)


def migrated_database(postgres: PostgresCluster, name: str) -> str:
    """Creates database `name` at head (a copy of a template migrated once per cluster) and
    returns its URL."""
    with _lock:
        if postgres.dsn() not in _pg_templates:
            postgres.drop_database(PG_TEMPLATE)
            postgres.create_database(PG_TEMPLATE)
            migrate.upgrade(postgres.url(PG_TEMPLATE))
            _pg_templates[postgres.dsn()] = PG_TEMPLATE
    return postgres.url(postgres.create_database(name, template=PG_TEMPLATE))
