"""CLI commands against a real control plane (`gpuplane controlplane serve` in a child)."""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

import pytest

from gpuplane_cli.pricing import fee_percent
from tests.cli.conftest import Cli, Served


def new_consumer(cli: Cli, served: Served) -> tuple[str, str]:
    """A fresh consumer tenant and key, made with the CLI; returns (tenant_id, secret)."""
    name = f"cli-{uuid.uuid4().hex[:8]}"
    made = cli("--json", "admin", "tenants", "create", name, key=served.admin_key)
    assert made.code == 0, made.err
    tenant = made.json()["tenant_id"]  # type: ignore[index]
    key = cli(
        "admin", "keys", "create", "--tenant", tenant, "--role", "consumer", key=served.admin_key
    )
    assert key.code == 0, key.err
    secret = key.out.splitlines()[-1]
    assert secret.startswith("gpk_")
    return tenant, secret


def test_whoami_for_humans_and_scripts(cli: Cli, served: Served) -> None:
    human = cli("whoami", key=served.admin_key)
    assert human.code == 0, human.err
    assert human.out.startswith("tenant platform, role admin, principal key_")
    data = cli("whoami", "--json", key=served.admin_key).json()
    assert data["role"] == "ROLE_ADMIN"  # type: ignore[index]


def test_tenants_and_keys_lifecycle(cli: Cli, served: Served) -> None:
    tenant, secret = new_consumer(cli, served)
    assert cli("whoami", key=secret).out.startswith(f"tenant {tenant}, role consumer")

    replay = cli("--json", "admin", "tenants", "create", "x-idem", "--idempotency-key", "k1",
                 key=served.admin_key)  # fmt: skip
    again = cli("--json", "admin", "tenants", "create", "x-idem", "--idempotency-key", "k1",
                key=served.admin_key)  # fmt: skip
    assert replay.json() == again.json()

    listing = cli("admin", "tenants", "list", key=served.admin_key)
    assert listing.out.splitlines()[0].split() == ["TENANT", "NAME", "WEIGHT", "CREATED"]
    assert tenant in listing.out

    keys = cli("--json", "admin", "keys", "list", "--tenant", tenant, key=served.admin_key).json()
    assert isinstance(keys, list)
    assert len(keys) == 1
    key_id = keys[0]["key_id"]
    assert cli("admin", "keys", "revoke", key_id, key=served.admin_key).code == 0
    revoked = cli("whoami", key=secret)
    assert revoked.code == 4
    assert revoked.err.startswith("error: UNAUTHENTICATED: ")
    assert "Traceback" not in revoked.err


def test_deposit_and_balance_are_exact(cli: Cli, served: Served) -> None:
    tenant, secret = new_consumer(cli, served)
    deposit = cli("ledger", "deposit", "2.5", "--tenant", tenant, "--reference", "test",
                  key=served.admin_key)  # fmt: skip
    assert deposit.code == 0, deposit.err
    assert "deposited 2.500000 credits" in deposit.out
    balance = cli("ledger", "balance", key=secret)
    assert "Available:  2.500000" in balance.out
    as_json = cli("ledger", "balance", "--json", key=secret).json()
    assert as_json["available_micro_credits"] == "2500000"  # type: ignore[index]
    statement = cli("ledger", "statement", key=secret)
    assert "+2.500000" in statement.out
    assert "deposit" in statement.out
    check = cli("ledger", "check", key=served.admin_key)
    assert check.code == 0
    assert "ledger consistent" in check.out


def test_submit_quote_and_refusal(cli: Cli, served: Served) -> None:
    _, secret = new_consumer(cli, served)
    quote = cli("jobs", "submit", "--image", "busybox", "--dry-run", "--max-price", "2.5",
                "--max-duration", "30m", "--", "echo", "hi", key=secret)  # fmt: skip
    assert quote.code == 0, quote.err
    assert "Would hold:" in quote.out
    assert "Matching hosts:" in quote.out
    broke = cli("jobs", "submit", "--image", "busybox", "--", "echo", "hi", key=secret)
    assert broke.code == 5
    assert broke.err.startswith("error: FAILED_PRECONDITION: ")
    invalid = cli("jobs", "submit", "--image", "Not An Image", key=secret)
    assert invalid.code == 2
    assert invalid.err.startswith("error: INVALID_ARGUMENT: --image: ")  # the flag, not spec.image


def test_not_found_and_permission_denied(cli: Cli, served: Served) -> None:
    _, secret = new_consumer(cli, served)
    missing = cli("jobs", "get", "job_does_not_exist", key=secret)
    assert missing.code == 3
    assert missing.err.startswith("error: NOT_FOUND: ")
    denied = cli("hosts", "list", key=secret)
    assert denied.code == 4
    assert denied.err.startswith("error: PERMISSION_DENIED: ")
    listing = cli("jobs", "list", key=secret)
    assert listing.code == 0
    assert listing.out.split() == ["JOB", "STATE", "IMAGE", "GPUS", "HOST", "CREATED", "CHARGED"]


def test_env_file_supplies_address_and_key(cli: Cli, served: Served, tmp_path: Path) -> None:
    env_file = tmp_path / "gpuplane.env"
    env_file.write_text(
        f"GPUPLANE_ADDR={served.addr}\nGPUPLANE_API_KEY={served.admin_key}\nGPUPLANE_PLAINTEXT=1\n"
    )
    cli.environ = {"GPUPLANE_ADDR": "127.0.0.1:1"}  # overridden by the named file
    run = cli("--env-file", str(env_file), "whoami")
    assert run.code == 0, run.err
    assert "role admin" in run.out


def test_registration_tokens(cli: Cli, served: Served) -> None:
    made = cli("--json", "admin", "tenants", "create", f"prov-{uuid.uuid4().hex[:8]}",
               key=served.admin_key)  # fmt: skip
    provider = made.json()["tenant_id"]  # type: ignore[index]
    created = cli("admin", "tokens", "create", "--provider", provider, "--label", "rack-1",
                  "--ttl", "1h", "--max-uses", "2", key=served.admin_key)  # fmt: skip
    assert created.code == 0, created.err
    assert created.out.splitlines()[-1].startswith("gpr_")
    tokens = cli("--json", "admin", "tokens", "list", "--provider", provider, key=served.admin_key)
    listed = tokens.json()
    assert isinstance(listed, list)
    assert [t["label"] for t in listed] == ["rack-1"]
    revoked = cli("admin", "tokens", "revoke", listed[0]["token_id"], key=served.admin_key)
    assert revoked.code == 0, revoked.err
    assert "revoked at" in revoked.out


def test_payouts_pricing_and_the_platform_balance(cli: Cli, served: Served) -> None:
    admin = served.admin_key
    listing = cli("ledger", "payouts", "list", "--all", key=admin)
    assert listing.code == 0, listing.err
    assert listing.out.split()[:3] == ["PAYOUT", "TENANT", "STATE"]
    missing = cli("ledger", "payouts", "paid", "po_missing", key=admin)
    assert missing.code == 3
    assert missing.err.startswith("error: NOT_FOUND: ")
    gone = cli("ledger", "payouts", "fail", "po_missing", "--reason", "bank", key=admin)
    assert gone.code == 3
    tenant, secret = new_consumer(cli, served)
    assert cli("ledger", "deposit", "3", "--tenant", tenant, key=admin).code == 0
    platform = cli("ledger", "balance", "--tenant", "platform", key=admin)
    assert platform.code == 0, platform.err
    assert "platform:external" in platform.out
    assert "platform:revenue" in platform.out
    held = cli("ledger", "statement", "--account", "held", key=secret)
    assert held.out.split() == ["TIME", "KIND", "ACCOUNT", "AMOUNT", "BALANCE", "JOB", "REFERENCE"]
    fee = cli("admin", "pricing", "set", "--fee", "12.5%", key=admin)
    assert fee.code == 0, fee.err
    assert "12.50% (1250 basis points)" in fee.out
    assert "12.50%" in cli("admin", "pricing", "get", key=secret).out
    assert [fee_percent(t) for t in ("10", "12.5%", "0", "100")] == [1000, 1250, 0, 10_000]
    for text in ("0.001", "101", "ten"):
        with pytest.raises(argparse.ArgumentTypeError):
            fee_percent(text)
    denied = cli("admin", "pricing", "set", "--fee", "1", key=secret)
    assert denied.code == 4
    assert cli("admin", "pricing", "set", "--fee", "10", key=admin).code == 0
