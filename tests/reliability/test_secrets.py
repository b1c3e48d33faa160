"""Secrets stay secret: API keys, registration tokens and host credentials never appear in
the logs (every logger at DEBUG), in any status detail a client gets back, in /metrics, in
the process's output or in the database, through a scenario that creates and uses them and
makes every kind of failing call with them."""

from __future__ import annotations

import logging
import secrets
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from gpuplane.v1 import admin_pb2, jobs_pb2, ledger_pb2, types_pb2

from devstack.factories import new_tenant
from tests.controlplane.scripted_host import ScriptedHost
from tests.harness import JobPlane, job_plane
from tests.reliability import summary

# An API key shows its first 10 characters (ApiKey.prefix) by design; the rest must not show.
SHOWN_PREFIX = 10


def everything_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in list(logging.root.manager.loggerDict):
        caplog.set_level(logging.DEBUG, logger=name)


async def failing(call: Any, details: list[str]) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    except grpc.aio.AioRpcError as error:
        details.append(f"{error.code().name} {error.details()} {error.debug_error_string()}")
        return error.code()
    raise AssertionError("the call was meant to fail")


async def scenario(plane: JobPlane, details: list[str]) -> dict[str, str]:
    """Creates every kind of secret, uses it, and fails with it in every way; returns them."""
    found: dict[str, str] = {"admin key": plane.admin_key, "consumer key": plane.consumer_key}
    _, found["provider key"] = await new_tenant(plane, "secret-provider", types_pb2.ROLE_PROVIDER)
    doomed = await plane.admin.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(
            tenant_id=plane.consumer_tenant, role=types_pb2.ROLE_CONSUMER, description="doomed"
        ),
        metadata=plane.auth(),
    )
    found["revoked key"] = doomed.secret
    await plane.admin.RevokeApiKey(
        admin_pb2.RevokeApiKeyRequest(key_id=doomed.key.key_id), metadata=plane.auth()
    )
    token = await plane.token()
    found["registration token"] = token
    host = ScriptedHost(plane.channel, plane.nats_url, token, gpus=1)
    await host.start()
    found["host credential"] = host.credential
    spent = await plane.token(max_uses=1)
    found["spent token"] = spent
    await ScriptedHost(plane.channel, plane.nats_url, spent, gpus=1).register()
    revoked_token = await plane.admin.CreateRegistrationToken(
        admin_pb2.CreateRegistrationTokenRequest(provider_tenant_id=plane.provider_tenant),
        metadata=plane.auth(),
    )
    found["revoked token"] = revoked_token.secret
    await plane.admin.RevokeRegistrationToken(
        admin_pb2.RevokeRegistrationTokenRequest(token_id=revoked_token.token.token_id),
        metadata=plane.auth(),
    )
    wrong = "gpk_" + secrets.token_urlsafe(32)
    found["unknown key"] = wrong

    # Using them where they are fine: the caller's own calls succeed.
    await plane.admin.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=plane.auth(plane.consumer_key))
    await plane.admin.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=plane.auth(host.credential))

    # And where they are not.
    calls: list[tuple[Any, grpc.StatusCode]] = []
    for key in (wrong, found["revoked key"], token, spent, found["revoked token"], wrong + "x"):
        calls.append(
            (
                lambda key=key: plane.admin.WhoAmI(
                    admin_pb2.WhoAmIRequest(), metadata=plane.auth(key)
                ),
                grpc.StatusCode.UNAUTHENTICATED,
            )
        )
        calls.append(
            (
                lambda key=key: plane.jobs.ListJobs(
                    jobs_pb2.ListJobsRequest(), metadata=plane.auth(key)
                ),
                grpc.StatusCode.UNAUTHENTICATED,
            )
        )
    for key in (host.credential, found["provider key"]):
        calls.append(
            (
                lambda key=key: plane.ledger.Deposit(
                    ledger_pb2.DepositRequest(
                        tenant_id=plane.consumer_tenant, amount_micro_credits=1, idempotency_key="x"
                    ),
                    metadata=plane.auth(key),
                ),
                grpc.StatusCode.PERMISSION_DENIED,
            )
        )
    calls.append(
        (
            lambda: plane.jobs.WatchJob(
                jobs_pb2.WatchJobRequest(job_id="job_x"), metadata=plane.auth(host.credential)
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    )
    # Malformed authorization metadata carrying a real secret.
    for value in (f"Basic {plane.admin_key}", f"Bearer{plane.admin_key}", plane.consumer_key):
        calls.append(
            (
                lambda value=value: plane.admin.WhoAmI(
                    admin_pb2.WhoAmIRequest(), metadata=(("authorization", value),)
                ),
                grpc.StatusCode.UNAUTHENTICATED,
            )
        )
    # RegisterHost with every wrong kind of token.
    for bad in (spent, found["revoked token"], wrong, host.credential, plane.admin_key):
        calls.append(
            (
                lambda bad=bad: ScriptedHost(plane.channel, plane.nats_url, bad, gpus=1).register(),
                grpc.StatusCode.PERMISSION_DENIED
                if bad in (spent, found["revoked token"])
                else grpc.StatusCode.UNAUTHENTICATED,
            )
        )
    for call, expected in calls:
        assert await failing(call, details) == expected, details[-1]
    summary.record("secrets", requests_tried=len(calls) + 2)
    await host.close()
    return found


def leaks(text: str, found: dict[str, str]) -> list[str]:
    hits = []
    for name, secret in found.items():
        if secret in text or secret[SHOWN_PREFIX:] in text:
            hits.append(name)
    return hits


async def test_secrets_never_leak(
    tmp_path: Path,
    nats_server: Any,
    s3_server: Any,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    everything_at_debug(caplog)
    details: list[str] = []
    data_dir = tmp_path / "cp"
    async with job_plane(data_dir, nats_server.url, s3_server) as plane:
        found = await scenario(plane, details)
        metrics_url = f"http://127.0.0.1:{plane.plane.metrics_port}/metrics"
        with urllib.request.urlopen(metrics_url, timeout=10) as reply:  # noqa: S310 - ours
            metrics = reply.read().decode()
        assert "gpuplane" in metrics
    logged = "\n".join(
        f"{r.name} {r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records
    )
    output = capfd.readouterr()
    assert len(caplog.records) > 10  # the capture saw the control plane at work
    assert leaks(f"<{found['host credential']}>", found) == ["host credential"]  # it can see
    assert not leaks(logged, found), "a secret was logged"
    assert not leaks("\n".join(details), found), "a secret came back in an error"
    assert not leaks(metrics, found), "a secret is in /metrics"
    assert not leaks(output.out + output.err, found), "a secret was printed"
    # At rest only hashes: the database holds none of them.
    database = b"".join(p.read_bytes() for p in data_dir.glob("gpuplane.db*"))
    assert database
    stored = leaks(database.decode("latin-1"), found)
    assert not stored, f"stored in plaintext: {stored}"
    summary.record(
        "secrets",
        f"{len(found)} secrets; {len(caplog.records)} log records, {len(details)} error "
        "details, /metrics, output and the database scanned",
    )
