"""A control plane's INVALID_ARGUMENT names a request field (`spec.memory_bytes`); the CLI
names the flag that set it (`--memory`), and only in commands that have that flag."""

from __future__ import annotations

import argparse

import pytest

from gpuplane_cli.flags import in_flags
from gpuplane_cli.jobs import submit_defaults
from tests.cli.conftest import Cli, Served
from tests.cli.test_short_ids import funded_consumer


@pytest.mark.parametrize(
    ("details", "named"),
    [
        ("spec.memory_bytes: larger than 16 TiB", "--memory: larger than 16 TiB"),
        ("spec.image: is required", "--image: is required"),
        (
            "spec.env['1X']: is not a valid variable name",
            "--env '1X': is not a valid variable name",
        ),
        ("spec.gpu_models[2]: must not be empty", "--gpu-model (#3): must not be empty"),
        ("spec.inputs[0].key: must be relative", "--input (#1) (key): must be relative"),
        ("spec.host_labels['a b']: bad key", "--host-label 'a b': bad key"),
        ("spec.max_duration_seconds: at most 7 days", "--max-duration: at most 7 days"),
        ("idempotency_key: too long", "--idempotency-key: too long"),
        ("spec.something_new: x", "spec.something_new: x"),  # no flag known: as sent
        ("no field here", "no field here"),
    ],
)
def test_submit_errors_name_flags(details: str, named: str) -> None:
    assert in_flags(details, submit_defaults()) == named


def test_a_command_without_the_flag_keeps_the_field() -> None:
    # `apply` sets the spec from a file: its errors keep the server's field names.
    assert in_flags("spec.memory_bytes: x", argparse.Namespace(file="job.yaml")) == (
        "spec.memory_bytes: x"
    )
    assert in_flags("reason: at most 500 characters", argparse.Namespace(reason="")) == (
        "--reason: at most 500 characters"
    )


def test_a_refused_submit_names_the_flag(cli: Cli, served: Served) -> None:
    _, key = funded_consumer(cli, served)
    small = cli("jobs", "submit", "--image", "busybox", "--memory", "1m", key=key)
    assert small.code == 2
    assert small.err == "error: INVALID_ARGUMENT: --memory: below Docker's minimum of 6 MiB\n"
    env = cli("jobs", "submit", "--image", "busybox", "--env", "1X=y", key=key)
    assert env.code == 2
    assert env.err == "error: INVALID_ARGUMENT: --env '1X': is not a valid variable name\n"
    reason = cli("jobs", "cancel", "job_" + "0" * 32, "--reason", "x" * 501, key=key)
    assert reason.code == 2
    assert reason.err == "error: INVALID_ARGUMENT: --reason: at most 500 characters\n"


def test_ledger_errors_name_flags(cli: Cli, served: Served) -> None:
    tenant, _ = funded_consumer(cli, served)
    admin = served.admin_key
    blank = cli("ledger", "payout", "1", "--destination", "", "--tenant", tenant, key=admin)
    assert blank.code == 2, blank.err
    assert blank.err == "error: INVALID_ARGUMENT: --destination: is required\n"
    in_flags_too = in_flags("amount_micro_credits: must be positive", argparse.Namespace(amount=1))
    assert in_flags_too == "AMOUNT: must be positive"
