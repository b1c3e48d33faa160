"""`gpuplane daemon run` flags: exact prices, labels, flags over GPUPLANE_DAEMON_* env, errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from daemon.cli import EXIT_USAGE, add_daemon_parser, run_daemon, settings_from_args


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpuplane daemon")
    add_daemon_parser(parser.add_subparsers(dest="daemon_command", required=True))
    return parser.parse_args(["run", *argv])


@pytest.mark.parametrize(
    ("text", "micro"),
    [("2.5", 2_500_000), ("0.000001", 1), ("3", 3_000_000), ("1.10", 1_100_000)],
)
def test_price_is_converted_exactly(text: str, micro: int, tmp_path: Path) -> None:
    args = parse("--price-per-gpu-hour", text, "--data-dir", str(tmp_path))
    assert settings_from_args(args).price_per_gpu_hour_micro_credits == micro


@pytest.mark.parametrize("text", ["0.0000001", "0", "-1", "abc", "nan"])
def test_bad_prices_are_usage_errors(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse("--price-per-gpu-hour", text)
    assert exited.value.code == 2
    assert "--price-per-gpu-hour" in capsys.readouterr().err


def test_flags_override_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUPLANE_DAEMON_CONTROL_PLANE", "from-env:1")
    monkeypatch.setenv("GPUPLANE_DAEMON_LOCATION", "env-location")
    monkeypatch.setenv("GPUPLANE_DAEMON_DATA_DIR", str(tmp_path / "env"))
    args = parse(
        "--control-plane",
        "from-flag:2",
        "--label",
        "rack=r1",
        "--label",
        "tier=gold",
        "--token",
        "grt_flag",
    )
    settings = settings_from_args(args)
    assert settings.control_plane == "from-flag:2"
    assert settings.location == "env-location"
    assert settings.data_dir == tmp_path / "env"
    assert settings.labels == {"rack": "r1", "tier": "gold"}
    assert settings.registration_token is not None
    assert settings.registration_token.get_secret_value() == "grt_flag"


def test_unknown_simulated_model_exits_with_usage_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse("--data-dir", str(tmp_path), "--simulate-gpus", "2xV100")
    assert run_daemon(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "unknown GPU model 'V100'" in err
    assert "A100-80GB" in err


def test_unregistered_host_without_token_exits_with_usage_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse("--data-dir", str(tmp_path), "--simulate-gpus", "1xL4")
    assert run_daemon(args) == EXIT_USAGE
    assert "no registration token was given: pass --token" in capsys.readouterr().err
