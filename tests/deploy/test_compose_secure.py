"""deploy/compose.secure.yaml over compose.yaml wires NATS credentials and TLS as the README
says: every NATS node includes the auth config `gpuplane nats init` writes and serves TLS, the
control planes read the seeds from a Compose secret (the env file `nats init` writes, never
Compose's environment), serve gRPC over TLS and reach NATS over it, the daemon verifies
both; every /run/secrets path used is a secret the service is given. Merged as Compose merges
files (mappings by key, volumes by target, the rest replaced), read as the settings read it."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.settings import Settings
from daemon.settings import DaemonSettings
from gpuplane_cli.natskeys import CONFIG_NAME, ENV_NAME
from tests.deploy.formats import (
    DEPLOY,
    interpolate_tree,
    parse_nats_config,
    read_env_file,
    service_environment,
)

pytestmark = pytest.mark.timeout(60)

NATS_NODES = ("nats-1", "nats-2", "nats-3")
PLANES = ("controlplane-1", "controlplane-2")
SECRET_PATH = re.compile(r"/run/secrets/([A-Za-z0-9_.-]+)")


def load(name: str) -> dict[str, Any]:
    loaded = yaml.safe_load((DEPLOY / name).read_text())
    assert isinstance(loaded, dict)
    return loaded


def target(volume: str) -> str:
    return volume.split(":")[1]


def merged_service(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`overlay` over `base` as `docker compose -f base -f overlay` merges a service."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if key == "environment":
            merged["environment"] = {**service_environment(base), **service_environment(overlay)}
        elif key == "volumes":
            kept = [v for v in base.get("volumes", []) if target(v) not in map(target, value)]
            merged["volumes"] = kept + list(value)
        elif key == "secrets":
            merged["secrets"] = sorted({*base.get("secrets", []), *value})
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = {**base[key], **value}
        else:
            merged[key] = value
    return merged


@pytest.fixture(scope="module")
def stack() -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(the merged services, interpolated as with compose.env.example, the secrets)."""
    base, overlay = load("compose.yaml"), load("compose.secure.yaml")
    assert set(overlay["services"]) <= set(base["services"])
    services = {
        name: merged_service(service, overlay["services"].get(name, {}))
        for name, service in base["services"].items()
    }
    variables = read_env_file(DEPLOY / "compose.env.example").values
    found = interpolate_tree(services, variables)
    assert isinstance(found, dict)
    return found, overlay["secrets"]


def mounted(service: dict[str, Any], container_path: str) -> Path:
    """The file under deploy/ mounted at `container_path` (or inside a mounted dir)."""
    for volume in service["volumes"]:
        source, path = str(volume).split(":")[:2]
        if container_path == path or container_path.startswith(path + "/"):
            return DEPLOY / source / os.path.relpath(container_path, path)
    raise AssertionError(f"nothing is mounted at {container_path}")


def test_nats_nodes_include_the_auth_config_and_serve_tls(stack: Any) -> None:
    services, _ = stack
    for node in NATS_NODES:
        service = services[node]
        config_path = service["command"][service["command"].index("-c") + 1]
        config_file = mounted(service, config_path)
        text = config_file.read_text()
        include = re.compile(r'^include "([^"]+)"$', re.MULTILINE)
        includes = include.findall(text)
        config = parse_nats_config(include.sub("", text))
        directory = str(Path(config_path).parent)
        assert mounted(service, f"{directory}/{includes[0]}") == DEPLOY / "nats" / "nats.conf"
        auth = mounted(service, f"{directory}/{includes[1]}")
        assert auth.name == CONFIG_NAME  # what `gpuplane nats init` writes
        assert auth.parent.name == "nats-keys"
        tls = config["tls"]
        assert isinstance(tls, dict)
        for key in ("cert_file", "key_file", "ca_file"):
            assert mounted(service, str(tls[key])).parent == DEPLOY / "secure" / "tls"


def test_control_planes_get_seeds_from_a_secret_and_serve_tls(
    stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    services, secrets = stack
    for name in PLANES:
        service = services[name]
        env = service_environment(service)
        assert not any("SEED" in key for key in env), "seeds are never in Compose's environment"
        command = service["command"]
        assert command[:2] == ["controlplane", "serve"]
        seeds = SECRET_PATH.fullmatch(command[command.index("--env-file") + 1])
        assert seeds is not None
        assert Path(secrets[seeds.group(1)]["file"]).name == ENV_NAME
        settings = settings_of(Settings, env, monkeypatch)
        assert isinstance(settings, Settings)
        assert not settings.allow_plaintext
        assert settings.tls_cert_file is not None
        assert str(settings.tls_key_file).startswith("/run/secrets/")
        urls = settings.nats_url.split(",")
        assert sorted(urls) == [f"tls://{node}:4222" for node in NATS_NODES]
        assert settings.nats_ca_file is not None
        health = " ".join(service["healthcheck"]["test"])
        assert "secure_channel" in health
        assert "insecure_channel" not in health


def test_daemon_verifies_the_control_plane_and_nats(
    stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    services, _ = stack
    settings = settings_of(DaemonSettings, service_environment(services["daemon"]), monkeypatch)
    assert isinstance(settings, DaemonSettings)
    assert not settings.plaintext
    assert str(settings.tls_ca_file).startswith("/run/secrets/")
    assert settings.nats_ca_file == settings.tls_ca_file


def test_every_secret_used_is_given_and_defined(stack: Any) -> None:
    services, secrets = stack
    for name, service in services.items():
        used = set(SECRET_PATH.findall(yaml.safe_dump(service)))
        assert used <= set(service.get("secrets", [])), name
        for secret in service.get("secrets", []):
            assert secrets[secret]["file"].startswith("./secure/"), secret


def test_the_readme_names_the_overlay() -> None:
    readme = (DEPLOY / "README.md").read_text()
    assert "compose.secure.yaml" in readme
    assert "Compose with NATS credentials and TLS" in readme


def settings_of(cls: type[Any], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """`cls()` in an environment of exactly the GPUPLANE_* variables of `env`."""
    for key in list(os.environ):
        if key.upper().startswith("GPUPLANE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("GPUPLANE_"):
            monkeypatch.setenv(key, value)
    return cls()
