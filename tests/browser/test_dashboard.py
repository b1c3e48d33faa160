"""The dashboard in headless Chromium against a real stack: login (a wrong key, by keyboard), a
consumer's job from the submit form to SUCCEEDED with live logs, its result downloaded and
its charge in the statement; a provider's GPU chart moving while a job runs; an operator
draining a host; an expired session keeping a half-filled form; the phone layout; logout."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import pytest
from gpuplane.v1 import admin_pb2, jobs_pb2, registry_pb2, registry_pb2_grpc, types_pb2
from playwright.async_api import Page, expect

from tests.browser.conftest import Stack, publish, screenshot
from tests.controlplane.test_fleet_status import fleet_when, hold_unpublished, publish_held

pytestmark = [pytest.mark.timeout(120), pytest.mark.docker]

S = types_pb2


async def log_in(page: Page, stack: Stack, key: str) -> None:
    await page.goto(stack.url)
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("button", name="Log out")).to_be_visible()
    await expect(page).to_have_url(re.compile(r"#/(jobs|hosts|fleet)$"))  # the role's home


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


async def test_a_wrong_key_gets_a_clear_message_and_no_session(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    await page.goto(stack.url)
    # By keyboard alone: the key field has the focus; type, Enter.
    await expect(page.get_by_label("API key")).to_be_focused()
    await page.keyboard.type("gpk_not-a-key")
    await page.keyboard.press("Enter")
    alert = page.get_by_role("alert")
    await expect(alert).to_have_text("Invalid API key.")
    await expect(page.get_by_role("button", name="Log out")).to_have_count(0)
    await page.screenshot(path=screenshot(tmp_path, "wrong-key"))
    # The session endpoint agrees: nothing was granted.
    status = await page.evaluate("fetch('/auth/session').then(r => r.status)")
    assert status == 401


async def test_consumer_submits_from_the_form_follows_logs_downloads_and_is_charged(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    plane = stack.plane
    await log_in(page, stack, plane.consumer_key)
    await page.get_by_role("link", name="Submit").click()
    script = (
        "echo hello from the browser; sleep 3; echo second line; "
        "printf 'the answer\\n' > /output/result.txt"
    )
    await page.get_by_label("Image").fill(stack.test_image)
    await page.get_by_label("Command").fill(f"sh\n-c\n{script}")
    await page.get_by_label("Max duration (seconds)").fill("120")
    # The live quote (a dry run) prices the form as it is typed.
    await expect(page.get_by_test_id("quote")).to_contain_text("Hold 0.06 cr")
    await expect(page.get_by_test_id("quote")).to_contain_text("1 matching host")
    await page.get_by_role("button", name="Submit job").click()

    await expect(page).to_have_url(re.compile(r"#/jobs/job_"))
    job_id = page.url.rsplit("/", 1)[1]
    logs = page.get_by_test_id("logs")
    # The first line appears while the job still runs: the page follows the stream.
    await expect(logs).to_contain_text("hello from the browser", timeout=30_000)
    job = await plane.get(job_id)
    # (Its RUNNING report may still be on its way: the container's output can come first.)
    running = (S.JOB_STATE_STARTING, S.JOB_STATE_RUNNING, S.JOB_STATE_UPLOADING)
    assert job.state in running, S.JobState.Name(job.state)
    assert "second line" not in (await logs.text_content() or "")
    await expect(logs).to_contain_text("second line", timeout=30_000)
    badge = page.locator(".page-head .badge")
    await expect(badge).to_have_text("SUCCEEDED", timeout=30_000)
    await expect(page.get_by_test_id("timeline")).to_contain_text("RUNNING")

    link = page.get_by_role("link", name="output/result.txt")
    await expect(link).to_be_visible()
    href = await link.get_attribute("href")
    assert href is not None
    assert await asyncio.to_thread(fetch, href) == b"the answer\n"

    done = await plane.get(job_id)
    assert done.charged_micro_credits > 0
    cost = page.get_by_test_id("cost")
    await expect(cost).to_have_text(credits(done.charged_micro_credits))
    shot = screenshot(tmp_path, "job")
    await page.screenshot(path=shot, full_page=True)
    publish(shot, "dashboard-job.png")

    await page.get_by_role("link", name="Statement").click()
    rows = page.get_by_test_id("statement").locator(f'tr[data-job-id="{job_id}"]')
    charge = rows.and_(page.locator('[data-kind="charge"]'))
    await expect(charge.first).to_be_visible()
    listed = await plane.jobs.ListJobs(
        jobs_pb2.ListJobsRequest(page_size=1), metadata=plane.auth(plane.consumer_key)
    )
    assert listed.jobs[0].job_id == job_id
    await page.screenshot(path=screenshot(tmp_path, "statement"), full_page=True)


async def test_jobs_list_filters_by_label_and_follows_states_live(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    plane = stack.plane
    await log_in(page, stack, plane.consumer_key)
    other = await plane.submit(command=["true"], gpu_count=1, labels={"run": "other"})
    await plane.wait_for(other.job_id, [S.JOB_STATE_SUCCEEDED], timeout=30)
    job = await plane.submit(command=["sleep", "4"], gpu_count=1, labels={"run": "mine"})
    await page.goto(f"{stack.url}#/jobs")
    await page.get_by_label("Labels").fill("run=mine")
    await page.get_by_role("button", name="Filter").click()
    rows = page.locator("tbody tr[data-job-id]")
    await expect(rows).to_have_count(1)
    row = page.locator(f'tr[data-job-id="{job.job_id}"]')
    await expect(row.locator(".badge")).not_to_have_text("SUCCEEDED")
    # The list reloads every 15 s; its row's WatchJob stream shows the end well before.
    await expect(row.locator(".badge")).to_have_text("SUCCEEDED", timeout=13_000)
    await page.screenshot(path=screenshot(tmp_path, "jobs"), full_page=True)


async def test_consumer_cancels_a_running_job_from_its_page(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    plane = stack.plane
    await log_in(page, stack, plane.consumer_key)
    job = await plane.submit(command=["sleep", "60"], gpu_count=1)
    await page.goto(f"{stack.url}#/jobs/{job.job_id}")
    badge = page.locator(".page-head .badge")
    await expect(badge).to_have_text("RUNNING", timeout=30_000)
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await page.get_by_role("button", name="Cancel job").click()
    await expect(badge).to_have_text("CANCELLED", timeout=30_000)
    await expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
    assert (await plane.get(job.job_id)).state == S.JOB_STATE_CANCELLED


async def test_consumer_filters_offers(page: Page, stack: Stack, tmp_path: Path) -> None:
    await log_in(page, stack, stack.plane.consumer_key)
    await page.get_by_role("link", name="Offers").click()
    offer = page.get_by_role("cell", name="NVIDIA A100-SXM4-80GB")
    await expect(offer).to_be_visible()
    await page.get_by_label("GPU model").fill("h100")
    await page.get_by_role("button", name="Filter").click()
    await expect(page.get_by_role("cell", name="No offers match.")).to_be_visible()
    await page.get_by_label("GPU model").fill("a100")
    await page.get_by_label("Max price (credits)").fill("1.8")
    await page.get_by_role("button", name="Filter").click()
    await expect(offer).to_be_visible()
    await page.screenshot(path=screenshot(tmp_path, "offers"), full_page=True)


def credits(micro: int) -> str:
    """As the dashboard writes an amount (web/src/format.ts)."""
    whole, fraction = divmod(micro, 1_000_000)
    digits = f"{fraction:06d}".rstrip("0")
    return f"{whole:,}{'.' + digits if digits else ''} cr"


async def test_provider_sees_the_gpu_chart_move_while_a_job_runs(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    plane = stack.plane
    await log_in(page, stack, stack.provider_key)
    await expect(page).to_have_url(re.compile(r"#/hosts$"))
    await page.locator(f'tr[data-host-id="{stack.host_id}"] a').click()
    utilisation = page.get_by_test_id("chart-utilisation").locator("li[data-series='GPU']")
    await expect(utilisation).to_have_attribute("data-latest", "0", timeout=15_000)

    job = await plane.submit(image=stack.test_image, command=["sleep", "30"], gpu_count=1)
    try:
        await plane.wait_for(job.job_id, [S.JOB_STATE_RUNNING], timeout=30)
        # The simulated GPU reports 85-100 % while busy: the chart's newest point rises.
        await expect(utilisation).to_have_attribute(
            "data-latest", re.compile(r"^(8[5-9]|9\d|100)$"), timeout=15_000
        )
        count = int(await utilisation.get_attribute("data-count") or 0)
        assert count >= 2
        await expect(page.get_by_test_id("chart-power").locator("li")).not_to_have_attribute(
            "data-latest", ""
        )
        shot = screenshot(tmp_path, "host")
        await page.screenshot(path=shot, full_page=True)
        publish(shot, "dashboard-host.png")
    finally:
        await plane.jobs.CancelJob(
            jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
        )
        await plane.wait_for(job.job_id, [S.JOB_STATE_CANCELLED], timeout=30)
    # The provider's earnings: what the host's jobs were charged, less the platform's fee.
    balance = await plane.balance(plane.provider_tenant)
    assert balance.earnings_micro_credits > 0
    await page.get_by_role("link", name="Earnings").click()
    await expect(page.get_by_test_id("earnings")).to_have_text(
        f"{credits(balance.earnings_micro_credits)} earned, not yet paid out"
    )
    await page.screenshot(path=screenshot(tmp_path, "earnings"), full_page=True)
    # Tokens for new hosts come from an admin here (self-service onboarding is off): the
    # server's reason is shown as it is.
    await page.get_by_role("link", name="Hosts").click()
    await page.get_by_label("Token label").fill("rack 9")
    await page.get_by_role("button", name="New registration token").click()
    await expect(page.get_by_role("alert")).to_contain_text("minted by an admin")


async def operator_sees_the_fleet(page: Page, stack: Stack, tmp_path: Path) -> None:
    """The fleet page: a job no host can take yet queued (a scheduler cycle looks at it), an
    outbox row held unpublished for 90 s: the cycle time and the outbox lag are shown."""
    plane = stack.plane
    assert plane.plane.db is not None
    job = await plane.submit(image=stack.test_image, command=["true"], gpu_count=8)
    held = await hold_unpublished(plane.plane.db, ago=90.0, lease=60.0)
    try:
        await fleet_when(plane, lambda s: s.queue_depth >= 1 and s.scheduler.last_considered >= 1)
        await log_in(page, stack, plane.admin_key)
        await expect(page.get_by_test_id("fleet")).to_contain_text("Hosts")
        await expect(page.get_by_test_id("queue-depth")).to_have_text(re.compile(r"^[1-9]\d*$"))
        await expect(page.get_by_test_id("cycle-time")).to_have_text(
            re.compile(r"^\d+\.\d+ (ms|s)$")
        )
        await expect(page.get_by_test_id("scheduler-where")).to_have_text(
            "Measured on the leading replica."
        )
        await expect(page.get_by_test_id("outbox-lag")).to_have_text(
            re.compile(r"^1m 3\ds \([1-9]\d*\)$")
        )
        await page.screenshot(path=screenshot(tmp_path, "fleet"), full_page=True)
    finally:
        await publish_held(plane.plane.db, held)
        await plane.jobs.CancelJob(
            jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
        )
        await plane.wait_for(job.job_id, [S.JOB_STATE_CANCELLED], timeout=30)


async def test_operator_drains_and_undrains_a_host(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    plane = stack.plane
    registry = registry_pb2_grpc.RegistryServiceStub(plane.channel)
    await operator_sees_the_fleet(page, stack, tmp_path)
    await page.get_by_role("link", name="Tenants & keys").click()
    tenant = page.get_by_role("cell", name=plane.consumer_tenant, exact=True)
    await expect(tenant.first).to_be_visible()  # its row, and its key's
    # A new tenant and a consumer key for it, whose secret works at once.
    await page.get_by_label("Tenant name").fill("made in the browser")
    await page.get_by_role("button", name="Create tenant").click()
    await expect(page.get_by_role("cell", name="made in the browser")).to_be_visible()
    tenant_id = await page.get_by_label("Key for tenant").input_value()
    assert tenant_id.startswith("ten_")
    await page.get_by_role("button", name="Create API key").click()
    secret = await page.get_by_test_id("secret").locator(".secret-value").text_content()
    assert secret is not None
    who = await plane.admin.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=plane.auth(secret))
    assert (who.tenant_id, who.role) == (tenant_id, S.ROLE_CONSUMER)
    # A registration token for the provider's next host, shown once.
    await page.get_by_role("link", name="Hosts").click()
    await page.get_by_label("Provider tenant").fill(plane.provider_tenant)
    await page.get_by_label("Token label").fill("rack 9")
    await page.get_by_role("button", name="New registration token").click()
    token = page.get_by_test_id("secret").locator(".secret-value")
    await expect(token).to_have_text(re.compile(r"^gpr_"))
    tokens = await plane.admin.ListRegistrationTokens(
        admin_pb2.ListRegistrationTokensRequest(provider_tenant_id=plane.provider_tenant),
        metadata=plane.auth(),
    )
    assert "rack 9" in [t.label for t in tokens.tokens]
    await page.get_by_role("link", name="Usage").click()
    await expect(page.get_by_role("figure", name="GPU time by GPU model")).to_contain_text(
        "NVIDIA A100-SXM4-80GB"
    )
    await page.screenshot(path=screenshot(tmp_path, "usage"), full_page=True)
    await page.goto(f"{stack.url}#/hosts/{stack.host_id}")
    await page.get_by_label("Drain reason").fill("disk swap")
    await page.get_by_role("button", name="Drain host").click()
    await expect(page.locator(".page-head .badge")).to_have_text(re.compile("DRAIN(ING|ED)"))
    got = await registry.GetHost(
        registry_pb2.GetHostRequest(host_id=stack.host_id), metadata=plane.auth()
    )
    assert got.host.state in (S.HOST_STATE_DRAINING, S.HOST_STATE_DRAINED)
    assert got.host.drain_reason == "disk swap"
    await page.screenshot(path=screenshot(tmp_path, "drained"), full_page=True)

    await page.get_by_role("button", name="Undrain host").click()
    await expect(page.locator(".page-head .badge")).to_have_text("ONLINE")
    got = await registry.GetHost(
        registry_pb2.GetHostRequest(host_id=stack.host_id), metadata=plane.auth()
    )
    assert got.host.state == S.HOST_STATE_ONLINE


async def test_an_expired_session_returns_to_login_and_keeps_the_form(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    await log_in(page, stack, stack.plane.consumer_key)
    await page.goto(f"{stack.url}#/submit")
    await page.get_by_label("Image").fill("example/trainer:1")
    await page.get_by_label("Labels").fill("team=ml")
    await page.context.clear_cookies()  # the session ends (as after its idle timeout)
    await page.get_by_label("GPUs").fill("2")  # the quote's RPC meets the ended session
    await expect(page.get_by_role("status")).to_contain_text("session has expired")
    await page.screenshot(path=screenshot(tmp_path, "expired"))

    await page.get_by_label("API key").fill(stack.plane.consumer_key)
    await page.get_by_role("button", name="Log in").click()
    await expect(page).to_have_url(re.compile(r"#/submit$"))
    await expect(page.get_by_label("Image")).to_have_value("example/trainer:1")
    await expect(page.get_by_label("Labels")).to_have_value("team=ml")
    await expect(page.get_by_label("GPUs")).to_have_value("2")


async def test_phone_width_has_no_sideways_scrolling_and_logout_ends_the_session(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    await page.set_viewport_size({"width": 390, "height": 844})
    await log_in(page, stack, stack.plane.consumer_key)
    listed = await stack.plane.jobs.ListJobs(
        jobs_pb2.ListJobsRequest(page_size=1), metadata=stack.plane.auth(stack.plane.consumer_key)
    )
    job_page = f"#/jobs/{listed.jobs[0].job_id}"
    for route in ("#/jobs", "#/submit", "#/statement", "#/usage", job_page):
        await page.goto(f"{stack.url}{route}")
        await expect(page.get_by_role("heading", level=1)).to_be_visible()
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"{route} is {width} px wide at a 390 px viewport"
        name = "job" if route == job_page else route.strip("#/")
        await page.screenshot(path=screenshot(tmp_path, f"phone-{name}"), full_page=True)
    # Logging out ends the session on the server too.
    await page.get_by_role("button", name="Log out").click()
    await expect(page.get_by_role("status")).to_have_text("You are logged out.")
    assert await page.evaluate("fetch('/auth/session').then(r => r.status)") == 401
