"""The dashboard's live streams reconnect by themselves: a job page open while its control
plane stops and starts again on the same ports and database shows, through its reopened
WatchJob stream, the cancel made after the restart; the browser session survives it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from gpuplane.v1 import jobs_pb2
from playwright.async_api import Browser, expect
from pydantic import SecretStr

from controlplane.settings import Settings
from devstack import NatsServer, S3Server, free_ports
from tests.browser.conftest import screenshot
from tests.harness import job_plane, open_plane

pytestmark = [pytest.mark.timeout(120)]


async def test_the_job_page_reconnects_after_a_control_plane_restart(
    tmp_path: Path, nats_server: NatsServer, s3_server: S3Server, browser: Browser
) -> None:
    grpc_port, web_port = free_ports(2)
    options: dict[str, Any] = {}

    def configure(given: dict[str, Any]) -> None:
        given.update(
            listen_addr=f"127.0.0.1:{grpc_port}", dashboard_address=f"127.0.0.1:{web_port}"
        )
        options.update(given)

    url = f"http://127.0.0.1:{web_port}/"
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    try:
        cp = tmp_path / "cp"
        async with job_plane(cp, nats_server.url, s3_server, configure=configure) as first:
            consumer = first.consumer_key
            options["bootstrap_admin_key"] = SecretStr(first.admin_key)
            job = await first.submit(command=["true"], gpu_count=1)  # no host: stays queued
            await page.goto(url)
            await page.get_by_label("API key").fill(consumer)
            await page.get_by_role("button", name="Log in").click()
            await expect(page.get_by_role("button", name="Log out")).to_be_visible()
            await page.goto(f"{url}#/jobs/{job.job_id}")
            timeline = page.get_by_test_id("timeline")
            await expect(timeline).to_contain_text("QUEUED")
        # Stopped: the page's streams fail and retry until it is back.
        async with open_plane(Settings(**options)) as again:
            await again.jobs.CancelJob(
                jobs_pb2.CancelJobRequest(job_id=job.job_id, reason="after the restart"),
                metadata=again.auth(consumer),
            )
            # Only WatchJob feeds the timeline: the event arrives on the reopened stream.
            await expect(timeline).to_contain_text(
                re.compile("CANCELLED.*after the restart"), timeout=30_000
            )
            await expect(page.get_by_role("button", name="Log out")).to_be_visible()
            await page.screenshot(path=screenshot(tmp_path, "reconnected"), full_page=True)
    finally:
        await context.close()
