"""One real stack for the dashboard's browser tests: a control plane serving the dashboard,
NATS, S3, Docker and an in-process daemon with one simulated GPU; and headless Chromium
(Debian's /usr/bin/chromium, driven by Playwright) opening a fresh context per test."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from gpuplane.v1 import registry_pb2, registry_pb2_grpc, types_pb2
from playwright.async_api import Browser, Page, async_playwright
from pydantic import SecretStr

from daemon.agent import Agent
from daemon.settings import DaemonSettings
from devstack import DockerEngine, NatsServer, S3Server
from devstack.factories import new_key
from tests.harness import JobPlane, job_plane

CHROMIUM = Path("/usr/bin/chromium")
WEB_APP = Path(__file__).resolve().parents[2] / "web" / "dist" / "index.html"
PRICE = 1_800_000  # 1.8 credits per GPU-hour: 500 micro-credits per GPU-second
TELEMETRY_MS = 300


@dataclass
class Stack:
    """The running stack as the browser tests use it."""

    plane: JobPlane
    agent: Agent
    url: str  # the dashboard, e.g. http://127.0.0.1:41234/
    provider_key: str
    test_image: str

    @property
    def host_id(self) -> str:
        assert self.agent.host_id
        return str(self.agent.host_id)


@pytest.fixture(scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory,
    nats_server: NatsServer,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    test_image: str,
) -> AsyncIterator[Stack]:
    if not WEB_APP.is_file():
        pytest.fail(f"{WEB_APP} is missing: run scripts/bootstrap (it builds web/)")
    root = tmp_path_factory.mktemp("dashboard-stack")

    def configure(options: dict[str, Any]) -> None:
        options["dashboard_address"] = "127.0.0.1:0"
        options["telemetry_interval_ms"] = TELEMETRY_MS

    async with job_plane(root / "cp", nats_server.url, s3_server, configure=configure) as plane:
        token = await plane.token()
        agent = Agent(
            DaemonSettings(
                control_plane=plane.address,
                plaintext=True,
                registration_token=SecretStr(token),
                data_dir=root / "daemon",
                simulate_gpus="1xA100-80GB",
                gpu_device_requests="always",
                docker_host=docker_engine.base_url,
                heartbeat_interval_ms=200,
                reconnect_max_seconds=1.0,
                price_per_gpu_hour_micro_credits=PRICE,
            )
        )
        await agent.start()
        try:
            await online(plane)
            provider_key = await new_key(plane, plane.provider_tenant, types_pb2.ROLE_PROVIDER)
            url = f"http://127.0.0.1:{plane.plane.dashboard_port}/"
            yield Stack(plane, agent, url, provider_key, test_image)
        finally:
            await agent.stop()


async def online(plane: JobPlane, timeout: float = 30) -> None:
    """Waits for the daemon's host to be ONLINE (its GPUs offered)."""
    registry = registry_pb2_grpc.RegistryServiceStub(plane.channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = await registry.ListHosts(registry_pb2.ListHostsRequest(), metadata=plane.auth())
        if any(h.state == types_pb2.HOST_STATE_ONLINE for h in listed.hosts):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the daemon's host never came online")


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium from Debian's package: Playwright's own browser download is not
    reachable here, and the system package is what the CI image has."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/bootstrap (it installs chromium)")
    async with async_playwright() as driver:
        launched = await driver.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser, stack: Stack) -> AsyncIterator[Page]:
    """A page in a fresh browser context (no cookies) at 1280 × 900; the test fails if the
    page requested anything outside the dashboard's origin (fonts, CDNs, analytics)."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    opened = await context.new_page()
    outside: list[str] = []
    allowed = (stack.url.rstrip("/"), "data:", "blob:", "about:")

    def watch(request: Any) -> None:
        url = str(request.url)
        if not url.startswith(allowed):
            outside.append(url)

    opened.on("request", watch)
    # Errors the page logs (a CSP violation, an exception), but not the browser's note of an
    # expected 401 (the session check before login, a wrong key).
    errors: list[str] = []

    def console(message: Any) -> None:
        text = str(message.text)
        if message.type == "error" and "status of 401" not in text:
            errors.append(text)

    opened.on("console", console)
    opened.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield opened
    finally:
        await context.close()
    assert outside == [], f"the dashboard requested other origins: {outside}"
    assert errors == [], f"the page logged errors: {errors}"


def screenshot(directory: Path, name: str) -> Path:
    """Where a test's screenshot goes (created): `directory`/screenshots/`name`.png."""
    target = directory / "screenshots"
    target.mkdir(parents=True, exist_ok=True)
    return target / f"{name}.png"


def publish(shot: Path, name: str) -> None:
    """Copies a screenshot to docs/img/ for the README when GPUPLANE_UPDATE_SCREENSHOTS=1 (so
    that a test run leaves the checkout as it was)."""
    if os.environ.get("GPUPLANE_UPDATE_SCREENSHOTS") != "1":
        return
    docs = Path(__file__).resolve().parents[2] / "docs" / "img"
    docs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, docs / name)
