"""Fixtures: an ObjectStore on the session S3 server, one fresh bucket per test."""

from __future__ import annotations

import uuid

import pytest

from devstack import S3Server
from storage.objects import ObjectStore


@pytest.fixture
async def store(s3_server: S3Server) -> ObjectStore:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    object_store = ObjectStore(
        s3_server.endpoint, s3_server.access_key, s3_server.secret_key, bucket=bucket
    )
    await object_store.ensure_bucket()
    return object_store
