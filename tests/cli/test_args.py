"""The argument tree: job specs from flags, env files, option placement, `--` commands."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from gpuplane.v1 import types_pb2

from gpuplane_cli.client import CliError, Context, Target, load_env_file, parse_env_file
from gpuplane_cli.jobs import build_spec
from gpuplane_cli.main import apply_env_files, build_parser, main, split_command


def parse(*argv: str) -> argparse.Namespace:
    words, command = split_command(argv)
    args = build_parser(words).parse_args(words)
    if command:
        args.job_command = command
    return args


def spec_of(*argv: str, environ: dict[str, str] | None = None) -> types_pb2.JobSpec:
    args = parse("jobs", "submit", *argv)
    return build_spec(args, Context(args=args, environ=environ or {}))


def test_submit_flags_build_the_spec() -> None:
    spec = spec_of(
        "--image", "pytorch/pytorch:2.4.0",
        "--gpus", "2",
        "--gpu-model", "H100", "--gpu-model", "A100-80GB",
        "--min-vram", "40",
        "--max-duration", "10m",
        "--max-price", "2.5",
        "--budget", "0.000001",
        "--env", "A=1", "--env", "B=x=y",
        "--label", "team=ml",
        "--network",
        "--max-retries", "3",
        "--memory", "16g",
        "--cpus", "0.5",
        "--input", "data/train.csv:train.csv",
        "--", "python", "-c", "print('--')",
    )  # fmt: skip
    assert spec.image == "pytorch/pytorch:2.4.0"
    assert spec.gpu_count == 2
    assert list(spec.gpu_models) == ["H100", "A100-80GB"]
    assert spec.min_vram_gib == 40
    assert spec.max_duration_seconds == 600
    assert spec.max_price_per_gpu_hour_micro_credits == 2_500_000
    assert spec.budget_micro_credits == 1
    assert dict(spec.env) == {"A": "1", "B": "x=y"}
    assert dict(spec.labels) == {"team": "ml"}
    assert spec.network == types_pb2.NETWORK_MODE_BRIDGE
    assert spec.max_retries == 3
    assert spec.memory_bytes == 16 * 2**30
    assert spec.cpu_millicores == 500
    assert [(i.key, i.path) for i in spec.inputs] == [("data/train.csv", "train.csv")]
    assert list(spec.command) == []
    assert list(spec.args) == ["python", "-c", "print('--')"]


def test_submit_defaults() -> None:
    spec = spec_of("--image", "busybox")
    assert list(spec.command) == []
    assert list(spec.args) == []
    assert spec.gpu_count == 1
    assert spec.max_duration_seconds == 3600
    assert spec.network == types_pb2.NETWORK_MODE_NONE
    assert not spec.allow_simulated


def test_allow_simulated_defaults_from_the_environment() -> None:
    env = {"GPUPLANE_ALLOW_SIMULATED": "1"}
    assert spec_of("--image", "busybox", environ=env).allow_simulated
    assert not spec_of("--image", "busybox", "--no-allow-simulated", environ=env).allow_simulated
    assert spec_of("--image", "busybox", "--allow-simulated").allow_simulated


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-price", "0.0000001", "more than 6 decimal places"),
        ("--max-price", "1e3", "not a decimal amount"),
        ("--budget", "-2", "not a decimal amount"),
        ("--max-duration", "10x", "not a duration"),
        ("--env", "NOEQUALS", "KEY=VALUE"),
    ],
)
def test_bad_values_are_usage_errors(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["jobs", "submit", "--image", "busybox", flag, value], environ={})
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_command_after_dashes_only_for_submit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["whoami", "--", "echo"], environ={})
    assert "only accepted by `gpuplane jobs submit`" in capsys.readouterr().err


def test_connection_options_before_or_after_the_command() -> None:
    before = parse("--addr", "h:1", "--json", "jobs", "list")
    after = parse("jobs", "list", "--addr", "h:1", "--json")
    for args in (before, after):
        assert Target.from_args(args, {}).addr == "h:1"
        assert args.json
    mixed = parse("--addr", "h:1", "whoami", "--api-key", "k")
    target = Target.from_args(mixed, {"GPUPLANE_ADDR": "env:2"})
    assert (target.addr, target.api_key) == ("h:1", "k")


def test_target_from_environment() -> None:
    target = Target.from_args(parse("whoami"), {"GPUPLANE_ADDR": "e:3", "GPUPLANE_API_KEY": "s"})
    assert (target.addr, target.api_key) == ("e:3", "s")
    assert target.metadata() == (("authorization", "Bearer s"),)
    assert Target.from_args(parse("whoami"), {}).metadata() == ()


def test_parse_env_file_reads_shell_syntax() -> None:
    text = """
# comment
export GPUPLANE_ADDR=127.0.0.1:50051
GPUPLANE_API_KEY='gpk_abc'  # trailing comment
QUOTED="two words"
EMPTY=
"""
    assert parse_env_file(text) == {
        "GPUPLANE_ADDR": "127.0.0.1:50051",
        "GPUPLANE_API_KEY": "gpk_abc",
        "QUOTED": "two words",
        "EMPTY": "",
    }
    with pytest.raises(CliError, match="line 1"):
        parse_env_file("not a setting")


def test_env_file_precedence(tmp_path: Path) -> None:
    named = tmp_path / "named.env"
    named.write_text("GPUPLANE_ADDR=named:1\nGPUPLANE_API_KEY=named-key\n")
    ambient = tmp_path / "ambient.env"
    ambient.write_text("GPUPLANE_ADDR=ambient:2\nGPUPLANE_ALLOW_SIMULATED=1\n")
    # GPUPLANE_ENV_FILE only fills gaps; --env-file overrides the environment.
    environ = {"GPUPLANE_ENV_FILE": str(ambient), "GPUPLANE_ADDR": "shell:3"}
    apply_env_files(parse("whoami"), environ)
    assert environ["GPUPLANE_ADDR"] == "shell:3"
    assert environ["GPUPLANE_ALLOW_SIMULATED"] == "1"
    apply_env_files(parse("whoami", "--env-file", str(named)), environ)
    assert environ["GPUPLANE_ADDR"] == "named:1"
    assert environ["GPUPLANE_API_KEY"] == "named-key"
    with pytest.raises(CliError, match="cannot read env file"):
        load_env_file(str(tmp_path / "missing.env"), {}, override=True)


def test_missing_env_file_is_an_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--env-file", str(tmp_path / "nope.env"), "whoami"], environ={})
    assert code == 2
    assert capsys.readouterr().err.startswith("error: cannot read env file")


def test_unreachable_control_plane_is_exit_7(capsys: pytest.CaptureFixture[str]) -> None:
    from devstack import free_port

    code = main(["--addr", f"127.0.0.1:{free_port()}", "--timeout", "3", "whoami"], environ={})
    err = capsys.readouterr().err
    assert code == 7
    assert err.startswith("error: UNAVAILABLE: ") or err.startswith("error: DEADLINE_EXCEEDED")
    assert "Traceback" not in err


def test_every_group_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for group in ("jobs", "hosts", "ledger", "admin", "controlplane", "daemon"):
        with pytest.raises(SystemExit) as exit_info:
            main([group, "--help"], environ={})
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("submit", "watch", "drain", "statement", "payout", "tenants", "serve"):
        assert command in out
