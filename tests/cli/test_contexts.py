"""Contexts: `gpuplane context ...` writes the config file, and commands go where it says."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

import pytest

from devstack import free_port
from gpuplane_cli.client import CliError
from gpuplane_cli.contexts import layered
from tests.cli.conftest import Cli, Served
from tests.cli.test_commands import new_consumer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def home(capsys: pytest.CaptureFixture[str], served: Served, tmp_path: Path) -> Cli:
    """The CLI with no GPUPLANE_* environment, its config under tmp_path, and three contexts:
    `admin` and `consumer` at the real plane (each with its key file), `closed` at a port
    nothing listens on."""
    cli = Cli(capsys, {"XDG_CONFIG_HOME": str(tmp_path / "config")})
    plain = Cli(capsys, {"GPUPLANE_ADDR": served.addr, "GPUPLANE_PLAINTEXT": "1"})
    _, consumer_key = new_consumer(plain, served)
    for name, key in (("admin", served.admin_key), ("consumer", consumer_key)):
        (tmp_path / f"{name}.key").write_text(key + "\n")
        added = cli("context", "add", name, "--addr", served.addr, "--plaintext",
                    "--api-key-file", str(tmp_path / f"{name}.key"))  # fmt: skip
        assert added.code == 0, added.err
    closed = cli("context", "add", "closed", "--addr", f"127.0.0.1:{free_port()}", "--plaintext")
    assert closed.code == 0, closed.err
    return cli


def config_file(cli: Cli) -> Path:
    return Path(cli.environ["XDG_CONFIG_HOME"]) / "gpuplane" / "config.toml"


def test_commands_go_to_the_current_context_and_context_overrides_it(home: Cli) -> None:
    assert home("context", "use", "admin").code == 0
    assert home("whoami").out.startswith("tenant platform, role admin")
    consumer = home("--context", "consumer", "whoami")
    assert consumer.code == 0, consumer.err
    assert ", role consumer" in consumer.out
    assert home("whoami").out.startswith("tenant platform"), "--context is for one command"

    unreachable = home("whoami", "--context", "closed")
    assert unreachable.code == 7
    port = home("--json", "context", "show", "closed").json()["addr"]  # type: ignore[index]
    assert f"listening on {port}" in unreachable.err

    assert home("context", "use", "consumer").code == 0
    assert ", role consumer" in home("whoami").out
    listing = home("context", "list").out.splitlines()
    assert listing[0].split() == ["CURRENT", "NAME", "ADDR", "TLS"]
    assert [line.split()[:2] for line in listing if line.startswith("*")] == [["*", "consumer"]]


def test_the_file_is_private_and_holds_key_paths_not_keys(home: Cli, served: Served) -> None:
    path = config_file(home)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "gpk_" not in text
    assert served.admin_key not in text
    assert "api-key-file = " in text


def test_flags_and_environment_override_the_context(home: Cli, served: Served) -> None:
    assert home("context", "use", "closed").code == 0
    assert home("whoami").code == 7
    flag = home("whoami", "--addr", served.addr)
    assert flag.code == 4, "the address came from the flag; `closed` has no key"
    home.environ["GPUPLANE_ADDR"] = served.addr
    home.environ["GPUPLANE_API_KEY"] = served.admin_key
    env = home("whoami")
    assert env.code == 0, env.err
    assert env.out.startswith("tenant platform")

    # The `consumer` context's key file gives way to the environment's key, and to a flag's.
    del home.environ["GPUPLANE_ADDR"]
    assert home("--context", "consumer", "whoami").out.startswith("tenant platform")
    del home.environ["GPUPLANE_API_KEY"]
    flagged = home("--context", "consumer", "whoami", "--api-key", served.admin_key)
    assert flagged.out.startswith("tenant platform")
    assert ", role consumer" in home("--context", "consumer", "whoami").out


def test_unknown_and_duplicate_contexts_are_named(home: Cli) -> None:
    missing = home("--context", "prod", "whoami")
    assert missing.code == 3
    assert missing.err == (
        f"error: {config_file(home)}: context 'prod': no such context; "
        "known: admin, closed, consumer\n"
    )
    assert home("context", "use", "prod").code == 3
    again = home("context", "add", "admin", "--addr", "x:1")
    assert again.code == 5
    assert "context 'admin': already exists" in again.err
    no_key = home("context", "add", "k", "--addr", "x:1", "--api-key-file", "/nonexistent/k")
    assert no_key.code == 2
    assert no_key.err == "error: --api-key-file /nonexistent/k: no such file\n"
    assert home("context", "use", "closed").code == 0
    assert home("context", "remove", "closed").code == 0
    assert "*" not in home("context", "list").out, "removing the current one unsets it"


def test_a_garbled_file_is_named_with_its_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cli = Cli(capsys, {"XDG_CONFIG_HOME": str(tmp_path)})
    path = tmp_path / "gpuplane" / "config.toml"
    path.parent.mkdir()
    path.write_text('current-context = "a"\n[contexts.a]\naddr = \n')
    garbled = cli("whoami")
    assert garbled.code == 2
    assert garbled.err.startswith(f"error: {path}: ")
    assert "line 3" in garbled.err
    path.write_text('[contexts.a]\naddr = "h:1"\napi_key = "gpk_secret"\n')
    wrong_key = cli("--context", "a", "whoami")
    assert wrong_key.code == 2
    assert wrong_key.err.startswith(f"error: {path}: context 'a': unknown key 'api_key' (known: ")
    path.write_text('current-context = "gone"\n')
    dangling = cli("whoami")
    assert dangling.code == 3
    assert "context 'gone': no such context; known: none" in dangling.err


def test_the_environment_takes_tls_as_a_group_and_its_key_spares_the_key_file(
    tmp_path: Path,
) -> None:
    environ = {"XDG_CONFIG_HOME": str(tmp_path)}
    path = tmp_path / "gpuplane" / "config.toml"
    path.parent.mkdir()
    path.write_text(
        'current-context = "dev"\n[contexts.dev]\naddr = "h:1"\nplaintext = true\n'
        'api-key-file = "/nonexistent/key"\n'
    )
    args = argparse.Namespace()
    with_ca = layered(args, {**environ, "GPUPLANE_CA_FILE": "/ca.pem", "GPUPLANE_API_KEY": "k"})
    assert with_ca["GPUPLANE_ADDR"] == "h:1"
    assert "GPUPLANE_PLAINTEXT" not in with_ca, "the environment's CA is not mixed with plaintext"
    assert with_ca["GPUPLANE_API_KEY"] == "k"
    with pytest.raises(CliError, match="context 'dev': cannot read its api-key-file /nonexistent"):
        layered(args, environ)
