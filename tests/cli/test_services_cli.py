"""`gpuplane services …` against a served control plane (no host: replicas stay queued): bad
input is named by its flag, a used name is ALREADY_EXISTS, --json everywhere, scale, stop,
start and delete through the CLI, and a deleted service is NOT_FOUND."""

from __future__ import annotations

from tests.cli.conftest import Cli, Served
from tests.cli.test_short_ids import funded_consumer

DEPLOY = ("services", "deploy", "web", "--image", "busybox", "--max-price", "1")


def test_services_through_the_cli(cli: Cli, served: Served) -> None:
    _, key = funded_consumer(cli, served)
    for flag, value in (("--port", "0"), ("--port", "70000"), ("--health-path", "healthz")):
        args = ("--port", "8080", flag, value) if flag != "--port" else (flag, value)
        refused = cli(*DEPLOY, *args, key=key)
        assert refused.code == 2, refused.err
        assert refused.err.startswith(f"error: INVALID_ARGUMENT: {flag}: "), refused.err
    for replicas in ("-1", "33"):
        refused = cli(*DEPLOY, "--port", "8080", "--replicas", replicas, key=key)
        assert refused.code == 2, refused.err
        assert "--replicas: " in refused.err, refused.err

    made = cli(
        "--json", *DEPLOY, "--port", "8080", "--replicas", "0", "--gpus-per-replica", "0",
        "--health-path", "/", "--", "httpd", "-f", "-p", "8080", key=key,
    )  # fmt: skip
    assert made.code == 0, made.err
    shown = made.json()
    assert isinstance(shown, dict)
    assert shown["service_id"].startswith("svc_")
    assert shown["state"] == "SERVICE_STATE_ACTIVE"
    assert shown["spec"]["args"] == ["httpd", "-f", "-p", "8080"]
    again = cli(*DEPLOY, "--port", "8080", key=key)
    assert again.code != 0
    assert "ALREADY_EXISTS" in again.err, again.err

    listed = cli("services", "list", key=key)
    assert listed.code == 0, listed.err
    assert listed.out.splitlines()[0].split()[:3] == ["NAME", "STATE", "IMAGE"]
    assert listed.out.splitlines()[1].split()[0] == "web"
    scaled = cli("--json", "services", "scale", "web", "2", key=key)
    assert scaled.code == 0, scaled.err
    assert scaled.json()["desired_replicas"] == 2  # type: ignore[index]
    for verb, state in (("stop", "STOPPED"), ("start", "ACTIVE"), ("delete", "DELETED")):
        done = cli("--json", "services", verb, "web", key=key)
        assert done.code == 0, done.err
        assert done.json()["state"] == f"SERVICE_STATE_{state}"  # type: ignore[index]
    gone = cli("services", "get", "web", key=key)
    assert gone.code != 0
    assert "NOT_FOUND" in gone.err, gone.err
