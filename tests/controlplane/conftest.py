"""Fixtures: a bare control plane (no NATS, no tenants) on port 0, SQLite in a temp dir."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.settings import Settings
from tests.harness import JobPlane, open_plane


def sqlite_settings(data_dir: Path, **overrides: object) -> Settings:
    return Settings(
        data_dir=data_dir,
        listen_addr="127.0.0.1:0",
        metrics_addr="127.0.0.1:0",
        allow_plaintext=True,
        **overrides,  # type: ignore[arg-type]
    )


@pytest.fixture
async def control_plane(tmp_path: Path) -> AsyncIterator[JobPlane]:
    async with open_plane(sqlite_settings(tmp_path / "cp")) as running:
        yield running
