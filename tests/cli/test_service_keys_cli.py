"""`gpuplane services keys create|list|revoke NAME` against a served control plane: the
secret is printed once (and in --json), listings never show it, bad input is named by its
flag or argument, a revoked key shows when."""

from __future__ import annotations

from tests.cli.conftest import Cli, Served
from tests.cli.test_short_ids import funded_consumer

DEPLOY = ("services", "deploy", "web", "--image", "busybox", "--max-price", "1")


def test_service_keys_through_the_cli(cli: Cli, served: Served) -> None:
    _, key = funded_consumer(cli, served)
    made = cli(*DEPLOY, "--port", "8080", "--replicas", "0", key=key)
    assert made.code == 0, made.err

    long = cli("services", "keys", "create", "web", "--description", "x" * 501, key=key)
    assert long.code == 2, long.err
    assert long.err.startswith("error: INVALID_ARGUMENT: --description: "), long.err
    missing = cli("services", "keys", "create", "nope", key=key)
    assert missing.code != 0
    assert "NOT_FOUND: service: no service 'nope'" in missing.err, missing.err

    created = cli("services", "keys", "create", "web", "--description", "partner", key=key)
    assert created.code == 0, created.err
    first, secret = created.out.splitlines()[:2]
    assert first.startswith("caller key skey_")
    assert secret.startswith("gsk_")
    assert "shown only this once" in created.err
    key_id = first.split()[2]
    as_json = cli("--json", "services", "keys", "create", "web", key=key)
    assert as_json.code == 0, as_json.err
    shown = as_json.json()
    assert isinstance(shown, dict)
    assert shown["secret"].startswith("gsk_")
    assert shown["key"]["service_id"].startswith("svc_")

    listed = cli("services", "keys", "list", "web", key=key)
    assert listed.code == 0, listed.err
    assert listed.out.splitlines()[0].split()[:3] == ["KEY", "PREFIX", "CREATED"]
    assert key_id in listed.out
    assert secret not in listed.out
    assert secret[:10] + "…" in listed.out

    unknown = cli("services", "keys", "revoke", "web", "skey_nope", key=key)
    assert unknown.code != 0
    assert "NOT_FOUND: key_id: service 'web' has no key" in unknown.err, unknown.err
    empty = cli("services", "keys", "revoke", "web", "", key=key)
    assert empty.code == 2, empty.err
    assert empty.err.startswith("error: INVALID_ARGUMENT: KEY_ID: "), empty.err
    revoked = cli("--json", "services", "keys", "revoke", "web", key_id, key=key)
    assert revoked.code == 0, revoked.err
    assert revoked.json()["revoked_at"]  # type: ignore[index]
    live = cli("--json", "services", "keys", "list", "web", key=key).json()
    assert isinstance(live, list)
    assert key_id not in {k["key_id"] for k in live}
    every = cli("services", "keys", "list", "web", "--include-revoked", key=key)
    assert f"{key_id}" in every.out
    assert "revoked " in every.out
