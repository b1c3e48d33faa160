"""`gpuplane exec`, `shell` and `port-forward` arguments: ports parsed and checked before any
call, each mistake naming its argument; `--` accepted by exec as by jobs submit."""

from __future__ import annotations

import pytest

from gpuplane_cli.client import EXIT_USAGE, CliError
from gpuplane_cli.main import build_parser, main
from gpuplane_cli.tunnels import exec_command, parse_ports, port_forward, shell_command


@pytest.mark.parametrize(
    ("spec", "stdio", "expected"),
    [
        ("8888:8080", False, (8888, 8080)),
        ("0:80", False, (0, 80)),
        ("22", False, (22, 22)),
        ("2222", True, (0, 2222)),
    ],
)
def test_ports_parse(spec: str, stdio: bool, expected: tuple[int, int]) -> None:
    assert parse_ports(spec, stdio) == expected


@pytest.mark.parametrize(
    ("spec", "stdio", "named"),
    [
        ("8888:70000", False, "REMOTE"),
        ("x:80", False, "LOCAL"),
        ("80:0", False, "REMOTE"),
        ("-1:80", False, "LOCAL"),
        ("0", True, "--stdio PORT"),
        ("ssh", True, "--stdio PORT"),
    ],
)
def test_bad_ports_name_their_argument(spec: str, stdio: bool, named: str) -> None:
    with pytest.raises(CliError) as caught:
        parse_ports(spec, stdio)
    assert caught.value.code == EXIT_USAGE
    assert caught.value.message.startswith(f"{named}:")


def test_commands_are_registered() -> None:
    parser = build_parser()
    run = parser.parse_args(["exec", "3f9a", "-it"])
    assert (run.handler, run.job_id, run.stdin, run.tty) == (exec_command, "3f9a", True, True)
    assert parser.parse_args(["shell", "3f9a"]).handler is shell_command
    forward = parser.parse_args(["port-forward", "--stdio", "3f9a", "22"])
    assert (forward.handler, forward.stdio, forward.ports) == (port_forward, True, "22")


def test_dashes_are_only_for_submit_and_exec(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["jobs", "get", "3f9a", "--", "ls"], {})
    assert caught.value.code == EXIT_USAGE
    assert "`exec`" in capsys.readouterr().err
