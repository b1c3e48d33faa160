"""Secret files as the settings read them: one trailing newline stripped, a world-readable file
warned about, an empty one refused, and a secret set both ways refused naming both."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from controlplane.settings import Settings
from daemon.cli import add_daemon_parser, settings_from_args
from daemon.settings import DaemonSettings
from messaging.secretfiles import SecretFileError, read_secret_file


def test_one_trailing_newline_is_stripped(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("grt_abc\n\n")
    path.chmod(0o600)
    assert read_secret_file(path, "X_FILE") == "grt_abc\n"
    path.write_text("grt_abc")
    assert read_secret_file(path, "X_FILE") == "grt_abc"


def test_world_readable_file_is_read_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "key"
    path.write_text("secret\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="messaging.secretfiles"):
        assert read_secret_file(path, "GPUPLANE_S3_SECRET_KEY_FILE") == "secret"
    assert caplog.messages == [
        f"GPUPLANE_S3_SECRET_KEY_FILE: {path} is readable by every user; chmod o-r it"
    ]
    path.chmod(0o600)
    caplog.clear()
    read_secret_file(path, "GPUPLANE_S3_SECRET_KEY_FILE")
    assert caplog.messages == []


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_text("\n")
    with pytest.raises(SecretFileError, match=f"X_FILE: {path} is empty"):
        read_secret_file(path, "X_FILE")


def test_settings_read_their_files_and_refuse_both_ways(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("s3-secret-key", "token", "seed"):
        (tmp_path / name).write_text(f"{name}-value\n")
        (tmp_path / name).chmod(0o600)
    monkeypatch.setenv("GPUPLANE_S3_SECRET_KEY_FILE", str(tmp_path / "s3-secret-key"))
    assert Settings().s3_secret_key.get_secret_value() == "s3-secret-key-value"
    monkeypatch.setenv("GPUPLANE_DAEMON_REGISTRATION_TOKEN_FILE", str(tmp_path / "token"))
    token = DaemonSettings(data_dir=tmp_path).registration_token
    assert token is not None
    assert token.get_secret_value() == "token-value"
    monkeypatch.setenv("GPUPLANE_DAEMON_REGISTRATION_TOKEN", "grt_env")
    with pytest.raises(ValidationError) as both:
        DaemonSettings(data_dir=tmp_path)
    assert (
        "GPUPLANE_DAEMON_REGISTRATION_TOKEN and GPUPLANE_DAEMON_REGISTRATION_TOKEN_FILE "
        "exclude each other" in str(both.value)
    )
    monkeypatch.setenv("GPUPLANE_NATS_OPERATOR_SEED_FILE", str(tmp_path / "seed"))
    with pytest.raises(ValidationError, match="nats_operator_seed"):
        Settings()  # the three seeds go together, from files as from values


def test_a_daemon_flag_wins_over_the_environment_either_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`daemon run --token-file F` over GPUPLANE_DAEMON_REGISTRATION_TOKEN, and `--token T`
    over GPUPLANE_DAEMON_REGISTRATION_TOKEN_FILE: the flag's token, no conflict."""
    parser = argparse.ArgumentParser()
    add_daemon_parser(parser.add_subparsers())
    token_file = tmp_path / "token"
    token_file.write_text("grt_from_file\n")
    token_file.chmod(0o600)
    monkeypatch.setenv("GPUPLANE_DAEMON_REGISTRATION_TOKEN", "grt_from_env")
    args = parser.parse_args(["run", "--data-dir", str(tmp_path), "--token-file", str(token_file)])
    token = settings_from_args(args).registration_token
    assert token is not None
    assert token.get_secret_value() == "grt_from_file"
    monkeypatch.delenv("GPUPLANE_DAEMON_REGISTRATION_TOKEN")
    monkeypatch.setenv("GPUPLANE_DAEMON_REGISTRATION_TOKEN_FILE", str(tmp_path / "missing"))
    args = parser.parse_args(["run", "--data-dir", str(tmp_path), "--token", "grt_flag"])
    token = settings_from_args(args).registration_token
    assert token is not None
    assert token.get_secret_value() == "grt_flag"
