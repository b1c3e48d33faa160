"""The dashboard's server on a real control plane: browser login and sessions, CSRF checks,
gRPC-Web (unary, server streaming, errors), static files with their security headers."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from gpuplane.v1 import admin_pb2, jobs_pb2, registry_pb2, types_pb2
from pydantic import SecretStr, ValidationError
from sqlalchemy import update

from controlplane.auth.models import BrowserSession
from controlplane.db.base import utcnow
from controlplane.server import ControlPlane
from daemon.channel import ChannelSecurity
from devstack.certs import TestCerts
from devstack.factories import job_spec, new_key, new_tenant
from tests.controlplane.browser import GRPC_WEB, OK, Browser, dashboard_url, frame
from tests.controlplane.conftest import sqlite_settings
from tests.harness import JobPlane, job_plane, open_plane

INDEX = "<!doctype html><title>gpuplane</title><div id=app></div>"
ASSET = "console.log('gpuplane')"
FOREIGN = "http://evil.example"


@pytest.fixture(scope="module")
async def site(
    tmp_path_factory: pytest.TempPathFactory, nats_server: Any, s3_server: Any
) -> AsyncIterator[JobPlane]:
    """A control plane serving the dashboard on a free port, with a stand-in built app."""
    root = tmp_path_factory.mktemp("dashboard")
    app = root / "dist"
    (app / "assets").mkdir(parents=True)
    (app / "index.html").write_text(INDEX)
    (app / "assets" / "index-3f9c.js").write_text(ASSET)
    (root / "secret.txt").write_text("outside the app")

    def configure(options: dict[str, Any]) -> None:
        options.update(dashboard_address="127.0.0.1:0", dashboard_dir=app)

    async with job_plane(root / "cp", nats_server.url, s3_server, configure=configure) as plane:
        yield plane


def browser(plane: JobPlane, origin: str | None = None) -> Browser:
    return Browser(dashboard_url(plane), origin)


async def test_login_gives_a_strict_http_only_cookie(site: JobPlane) -> None:
    async with browser(site) as b:
        status, body, cookie = await b.login(site.consumer_key)
        assert status == 200
        assert body["tenant_id"] == site.consumer_tenant
        assert body["role"] == "consumer"
        assert body["key_id"].startswith("key_")
        attributes = [part.strip().lower() for part in cookie.split(";")]
        assert attributes[0].startswith("gpuplane_session=gps_")
        assert {"httponly", "samesite=strict", "path=/"} <= set(attributes)
        assert "secure" not in attributes  # served over plain HTTP here
        async with b.http.get("/auth/session") as response:
            assert response.status == 200
            assert await response.json() == body
        reply = await b.call("AdminService/WhoAmI", admin_pb2.WhoAmIRequest())
        assert reply.code == OK, reply.message
        (who,) = reply.decoded(admin_pb2.WhoAmIResponse)
        assert who.tenant_id == site.consumer_tenant
        # The spec's other name for the binary format works the same, and is echoed.
        plain = await b.call(
            "AdminService/WhoAmI",
            admin_pb2.WhoAmIRequest(),
            headers={"Content-Type": "application/grpc-web"},
        )
        assert plain.code == OK
        assert plain.headers["Content-Type"] == "application/grpc-web"
        assert plain.decoded(admin_pb2.WhoAmIResponse) == [who]


async def test_a_wrong_or_revoked_key_gets_the_same_401(site: JobPlane) -> None:
    revoked = await site.admin.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant_id=site.consumer_tenant, role=types_pb2.ROLE_CONSUMER),
        metadata=site.auth(),
    )
    await site.admin.RevokeApiKey(
        admin_pb2.RevokeApiKeyRequest(key_id=revoked.key.key_id), metadata=site.auth()
    )
    async with browser(site) as b:
        for key in ("gpk_" + "x" * 43, revoked.secret):
            status, body, cookie = await b.login(key)
            assert (status, body, cookie) == (401, {"error": "invalid API key"}, "")
        status, body, _ = await b.login(None)
        assert status == 400
        assert body["error"].startswith("api_key: required")
        async with b.http.get("/auth/session") as response:
            assert response.status == 401


async def test_logout_ends_the_session_server_side(site: JobPlane) -> None:
    async with browser(site) as b:
        await b.login(site.consumer_key)
        (token,) = [c.value for c in b.http.cookie_jar if c.key == "gpuplane_session"]
        assert await b.logout() == 204
        assert len(b.http.cookie_jar) == 0  # the cookie is cleared
    # The old cookie, kept by a copy of the browser, no longer works.
    async with browser(site) as b:
        b.http.cookie_jar.update_cookies({"gpuplane_session": token})
        reply = await b.call("AdminService/WhoAmI", admin_pb2.WhoAmIRequest())
        assert reply.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
        async with b.http.get("/auth/session") as response:
            assert response.status == 401


async def test_a_key_revoked_after_login_loses_access_on_the_next_call(site: JobPlane) -> None:
    key = await site.admin.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant_id=site.consumer_tenant, role=types_pb2.ROLE_CONSUMER),
        metadata=site.auth(),
    )
    async with browser(site) as b:
        assert (await b.login(key.secret))[0] == 200
        first = await b.call("JobService/ListJobs", jobs_pb2.ListJobsRequest())
        assert first.code == OK, first.message
        await site.admin.RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(key_id=key.key.key_id), metadata=site.auth()
        )
        after = await b.call("JobService/ListJobs", jobs_pb2.ListJobsRequest())
        assert after.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
        assert "log in again" in after.message


async def test_an_expired_or_idle_session_is_unauthenticated(site: JobPlane) -> None:
    db = site.plane.db
    assert db is not None
    past = utcnow() - timedelta(seconds=1)
    for column in ("expires_at", "last_used_at"):
        async with browser(site) as b:
            body = (await b.login(site.consumer_key))[1]
            assert (await b.call("AdminService/WhoAmI", admin_pb2.WhoAmIRequest())).code == OK
            # Every session of this key ends by time: its absolute or its idle expiry.
            stale = past - timedelta(days=30) if column == "last_used_at" else past
            async with db.transaction() as session:
                await session.execute(
                    update(BrowserSession)
                    .where(BrowserSession.api_key_id == body["key_id"])
                    .values({column: stale})
                )
            reply = await b.call("AdminService/WhoAmI", admin_pb2.WhoAmIRequest())
            assert reply.code == grpc.StatusCode.UNAUTHENTICATED.value[0], column
            async with b.http.get("/auth/session") as response:
                assert response.status == 401


async def test_cross_site_posts_are_refused(site: JobPlane) -> None:
    async with browser(site) as b:
        assert (await b.login(site.consumer_key))[0] == 200
        request = frame(admin_pb2.WhoAmIRequest().SerializeToString())
        headers = {"Content-Type": GRPC_WEB, "Origin": dashboard_url(site)}
        # No x-grpc-web header (a form or a script without a preflight could not set it).
        async with b.http.post(
            "/gpuplane.v1.AdminService/WhoAmI", data=request, headers=headers
        ) as response:
            assert response.status == 403
        # A foreign Origin, header or not.
        foreign = {**headers, "x-grpc-web": "1", "Origin": FOREIGN}
        async with b.http.post(
            "/gpuplane.v1.AdminService/WhoAmI", data=request, headers=foreign
        ) as response:
            assert response.status == 403
        async with b.http.post(
            "/auth/login", json={"api_key": site.consumer_key}, headers={"Origin": FOREIGN}
        ) as response:
            assert response.status == 403
        async with b.http.post("/auth/logout") as response:  # no x-gpuplane-csrf
            assert response.status == 403
        # The session was not ended by the refused logout.
        assert (await b.call("AdminService/WhoAmI", admin_pb2.WhoAmIRequest())).code == OK
    async with browser(site, origin=FOREIGN) as b:
        status, _, cookie = await b.login(site.consumer_key)
        assert (status, cookie) == (403, "")


async def test_behind_a_tls_proxy_the_forwarded_scheme_is_the_origin_s(site: JobPlane) -> None:
    """A TLS-terminating proxy says X-Forwarded-Proto: https; the browser's Origin is then
    https://, and the cookie Secure. Without the header that Origin is foreign."""
    https = dashboard_url(site).replace("http://", "https://")
    async with browser(site, origin=https) as b:
        status, _, _ = await b.login(site.consumer_key)
        assert status == 403
        async with b.http.post(
            "/auth/login",
            json={"api_key": site.consumer_key},
            headers={"Origin": https, "X-Forwarded-Proto": "https", "x-gpuplane-csrf": "1"},
        ) as response:
            assert response.status == 200
            cookie = response.headers["Set-Cookie"].lower()
        assert "secure" in [part.strip() for part in cookie.split(";")]


async def test_errors_keep_their_grpc_code_and_message(site: JobPlane) -> None:
    async with browser(site) as b:
        anonymous = await b.call("JobService/ListJobs", jobs_pb2.ListJobsRequest())
        assert anonymous.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
        await b.login(site.consumer_key)
        missing = await b.call("JobService/GetJob", jobs_pb2.GetJobRequest(job_id="job_nope"))
        assert missing.code == grpc.StatusCode.NOT_FOUND.value[0]
        assert "job_nope" in missing.message
        # Trailers-only: the status in the headers too.
        assert missing.headers["grpc-status"] == str(missing.code)
        bad = await b.call(
            "JobService/SubmitJob",
            jobs_pb2.SubmitJobRequest(spec=job_spec(gpu_count=0, image="")),
        )
        assert bad.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "image" in bad.message or "gpu_count" in bad.message
        # The string check runs as for gRPC: a control character in a field.
        nul = await b.call("JobService/GetJob", jobs_pb2.GetJobRequest(job_id="job\x00é"))
        assert nul.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "job_id" in nul.message
        # A browser cannot stream requests; an unknown method is not there.
        connect = await b.call("RegistryService/Connect", registry_pb2.DaemonMessage())
        assert connect.code == grpc.StatusCode.UNIMPLEMENTED.value[0]
        unknown = await b.call("JobService/NoSuchMethod", jobs_pb2.GetJobRequest())
        assert unknown.code == grpc.StatusCode.UNIMPLEMENTED.value[0]
        async with b.http.post(
            "/gpuplane.v1.JobService/GetJob",
            data=b"\x00\x00\x00\x00\x09short",
            headers={"Content-Type": GRPC_WEB, "x-grpc-web": "1"},
        ) as response:
            assert response.headers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
        async with b.http.post(
            "/gpuplane.v1.JobService/GetJob",
            data=b"{}",
            headers={"Content-Type": "application/json", "x-grpc-web": "1"},
        ) as response:
            assert response.status == 415


async def test_watch_job_streams_live_through_grpc_web(site: JobPlane) -> None:
    """A queued job (no host takes it) watched from the browser: its QUEUED event comes at
    once, and the cancel sent while the stream is open arrives on it, then the trailers."""
    async with browser(site) as b:
        await b.login(site.consumer_key)
        submitted = await b.call(
            "JobService/SubmitJob", jobs_pb2.SubmitJobRequest(spec=job_spec(gpu_count=1))
        )
        assert submitted.code == OK, submitted.message
        (job,) = submitted.decoded(jobs_pb2.SubmitJobResponse)
        job_id = job.job.job_id
        cancels: list[int] = []

        async def cancel_once(message: bytes) -> None:
            if not cancels:
                reply = await b.call(
                    "JobService/CancelJob", jobs_pb2.CancelJobRequest(job_id=job_id)
                )
                cancels.append(reply.code)

        watched = await asyncio.wait_for(
            b.call(
                "JobService/WatchJob",
                jobs_pb2.WatchJobRequest(job_id=job_id),
                on_message=cancel_once,
            ),
            timeout=20,
        )
    assert cancels == [OK]
    states = [e.state for e in watched.decoded(types_pb2.JobEvent)]
    assert states[0] == types_pb2.JOB_STATE_QUEUED
    assert states[-1] == types_pb2.JOB_STATE_CANCELLED
    assert watched.trailers["grpc-status"] == "0"
    assert "grpc-status" not in watched.headers  # not trailers-only


async def test_static_files_and_app_routes_carry_the_security_headers(site: JobPlane) -> None:
    async with browser(site) as b:
        for path in ("/", "/jobs/job_123", "/hosts"):
            async with b.http.get(path) as response:
                assert response.status == 200, path
                assert await response.text() == INDEX
                assert response.headers["Cache-Control"] == "no-cache"
                csp = response.headers["Content-Security-Policy"]
                assert "default-src 'self'" in csp
                assert "frame-ancestors 'none'" in csp
                assert response.headers["X-Content-Type-Options"] == "nosniff"
        async with b.http.get("/assets/index-3f9c.js") as response:
            assert response.status == 200
            assert await response.text() == ASSET
            assert "javascript" in response.headers["Content-Type"]
            assert "immutable" in response.headers["Cache-Control"]
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        for missing in ("/assets/gone.js", "/../secret.txt", "/%2e%2e/secret.txt"):
            async with b.http.get(missing) as response:
                assert response.status == 404, missing
                assert "outside the app" not in await response.text()
                assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_a_missing_build_says_what_to_run_and_the_api_still_works(
    tmp_path: Path,
) -> None:
    settings = sqlite_settings(
        tmp_path / "cp", dashboard_address="127.0.0.1:0", dashboard_dir=tmp_path / "none"
    )
    async with open_plane(settings) as plane, browser(plane) as b:
        async with b.http.get("/jobs") as response:
            assert response.status == 500
            assert "scripts/bootstrap" in await response.text()
            assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        assert (await b.login(plane.admin_key))[0] == 200
        assert (await b.call("AdminService/WhoAmI", admin_pb2.WhoAmIRequest())).code == OK


async def test_a_session_survives_a_control_plane_restart(tmp_path: Path) -> None:
    settings = sqlite_settings(
        tmp_path / "cp",
        dashboard_address="127.0.0.1:0",
        bootstrap_admin_key=SecretStr("gpk_restart-test-admin-key-0123456789abcdef"),
    )
    async with open_plane(settings) as plane, browser(plane) as b:
        assert (await b.login(plane.admin_key))[0] == 200
        cookies = {c.key: c.value for c in b.http.cookie_jar}
    async with open_plane(settings) as plane, browser(plane) as b:
        b.http.cookie_jar.update_cookies(cookies)
        reply = await b.call("AdminService/WhoAmI", admin_pb2.WhoAmIRequest())
        assert reply.code == OK, reply.message


async def test_rate_limits_apply_through_the_browser(tmp_path: Path) -> None:
    """A consumer's session spends its key's bucket; login attempts spend their address's."""
    settings = sqlite_settings(
        tmp_path / "cp",
        dashboard_address="127.0.0.1:0",
        rate_limit_per_second=0.001,
        rate_limit_burst=3,
    )
    async with open_plane(settings) as plane, browser(plane) as b:
        tenant = await new_tenant(plane, "limited")
        status, _, _ = await b.login(tenant.key)  # the address's first of 3
        assert status == 200
        codes = [
            (await b.call("AdminService/WhoAmI", admin_pb2.WhoAmIRequest())).code for _ in range(4)
        ]
        assert codes == [OK, OK, OK, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
        # The same key over gRPC shares the bucket: it is empty there too.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await plane.admin.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=plane.auth(tenant.key))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        other = await new_key(plane, tenant.tenant_id)
        statuses = [(await b.login(other))[0] for _ in range(3)]
        assert statuses == [200, 200, 429]


async def test_login_is_json_and_answers_no_detail(site: JobPlane) -> None:
    async with browser(site) as b:
        async with b.http.post(
            "/auth/login", data=b"not json", headers={"x-gpuplane-csrf": "1"}
        ) as response:
            assert response.status == 400
        # The API's paths are never the app's: no index.html for them.
        for path in ("/auth/login", "/auth/nothing", "/gpuplane.v1.AdminService/WhoAmI"):
            async with b.http.get(path) as response:
                assert response.status in (404, 405), path


async def test_over_tls_the_cookie_is_secure_and_the_proxy_needs_no_client_certificate(
    tmp_path: Path, test_certs: TestCerts
) -> None:
    """With TLS and client certificates required on gRPC, the dashboard serves HTTPS with the
    same certificate, its cookie is Secure, and gRPC-Web still reaches the gRPC server (over
    the private Unix socket: a browser has no client certificate)."""
    settings = sqlite_settings(
        tmp_path / "cp",
        dashboard_address="127.0.0.1:0",
        tls_cert_file=test_certs.server_cert,
        tls_key_file=test_certs.server_key,
        tls_client_ca_file=test_certs.ca_cert,
        tls_client_auth="require",
    )
    security = ChannelSecurity(
        ca_file=test_certs.ca_cert, cert_file=test_certs.client_cert, key_file=test_certs.client_key
    )
    trust = ssl.create_default_context(cafile=str(test_certs.ca_cert))
    async with open_plane(settings, security) as plane:
        url = f"https://127.0.0.1:{plane.plane.dashboard_port}"
        async with Browser(url, connector=aiohttp.TCPConnector(ssl=trust)) as b:
            status, _, cookie = await b.login(plane.admin_key)
            assert status == 200
            assert "secure" in [part.strip().lower() for part in cookie.split(";")]
            reply = await b.call("AdminService/WhoAmI", admin_pb2.WhoAmIRequest())
            assert reply.code == OK, reply.message


async def test_a_stream_in_flight_ends_unavailable_when_the_control_plane_stops(
    tmp_path: Path,
) -> None:
    """The page sees UNAVAILABLE in the trailers (and reconnects), not a cut connection."""
    settings = sqlite_settings(tmp_path / "cp", dashboard_address="127.0.0.1:0")
    async with open_plane(settings) as plane, browser(plane) as b:
        tenant = await new_tenant(plane, "watcher", micro_credits=10**9)
        await b.login(tenant.key)
        submitted = await b.call(
            "JobService/SubmitJob", jobs_pb2.SubmitJobRequest(spec=job_spec(gpu_count=1))
        )
        assert submitted.code == OK, submitted.message
        (job,) = submitted.decoded(jobs_pb2.SubmitJobResponse)
        first = asyncio.Event()

        async def seen(message: bytes) -> None:
            first.set()

        watch = asyncio.create_task(
            b.call(
                "JobService/WatchJob",
                jobs_pb2.WatchJobRequest(job_id=job.job.job_id),
                on_message=seen,
            )
        )
        await asyncio.wait_for(first.wait(), 10)
        await plane.plane.stop(grace=0)
        watched = await asyncio.wait_for(watch, 10)
    assert watched.decoded(types_pb2.JobEvent)[0].state == types_pb2.JOB_STATE_QUEUED
    assert watched.trailers["grpc-status"] == str(grpc.StatusCode.UNAVAILABLE.value[0])
    assert "reconnect" in watched.message


def test_the_address_must_be_host_and_port(tmp_path: Path) -> None:
    for bad in ("8080", "localhost", "127.0.0.1:http", "127.0.0.1:70000"):
        with pytest.raises(ValidationError) as caught:
            sqlite_settings(tmp_path, dashboard_address=bad)
        assert "dashboard_address" in str(caught.value)
    assert sqlite_settings(tmp_path, dashboard_address="[::1]:0").dashboard.address == "[::1]:0"


async def test_a_taken_port_fails_start_naming_the_dashboard(
    site: JobPlane, tmp_path: Path
) -> None:
    taken = f"127.0.0.1:{site.plane.dashboard_port}"
    plane = ControlPlane(sqlite_settings(tmp_path / "cp", dashboard_address=taken))
    try:
        with pytest.raises(OSError, match=f"dashboard: cannot listen on {taken}"):
            await plane.start()
    finally:
        await plane.stop(grace=0)  # as `gpuplane up` does before it tries another port
