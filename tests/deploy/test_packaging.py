"""deploy/ agrees with the code: the compose file's structure, the Dockerfiles, the NATS
config, and every GPUPLANE_* variable they or the env examples set is a field of Settings or
DaemonSettings that accepts the value given."""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from controlplane.settings import Settings
from daemon.settings import DaemonSettings
from tests.deploy.formats import (
    DEPLOY,
    ROOT,
    Dockerfile,
    compose_variables,
    dockerignore,
    env_names,
    healthcheck_command,
    ignored,
    interpolate_tree,
    parse_copy,
    parse_dockerfile,
    parse_nats_config,
    read_env_file,
    service_environment,
)

pytestmark = pytest.mark.timeout(60)

COMPOSE = DEPLOY / "compose.yaml"
NATS_CONF = DEPLOY / "nats" / "nats.conf"
# Which settings class reads the environment of a process started from each image.
IMAGES: dict[str, type[BaseSettings]] = {
    "deploy/Dockerfile.controlplane": Settings,
    "deploy/Dockerfile.daemon": DaemonSettings,
}
ENV_EXAMPLES: dict[str, type[BaseSettings]] = {
    "controlplane.env.example": Settings,
    "daemon.env.example": DaemonSettings,
}
NATS_NODES = ("nats-1", "nats-2", "nats-3")
DEPENDENCY_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services as Compose sees them with deploy/.env copied from compose.env.example."""
    found = interpolate_tree(compose["services"], compose_example_variables())
    assert isinstance(found, dict)
    return found


@pytest.fixture(scope="module")
def dockerfiles() -> dict[str, Dockerfile]:
    return {name: parse_dockerfile(ROOT / name) for name in IMAGES}


@pytest.fixture(scope="module")
def nats_conf() -> dict[str, Any]:
    return parse_nats_config(NATS_CONF.read_text())


def compose_example_variables() -> dict[str, str]:
    return read_env_file(DEPLOY / "compose.env.example").values


def dockerfile_of(service: Mapping[str, Any]) -> str | None:
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        context, dockerfile = build, "Dockerfile"
    else:
        context, dockerfile = build.get("context", "."), build.get("dockerfile", "Dockerfile")
    return str(((DEPLOY / context) / dockerfile).resolve().relative_to(ROOT))


def gpuplane_services(services: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(name, service, its Dockerfile) for every service running a gpuplane image."""
    for name, service in services.items():
        dockerfile = dockerfile_of(service)
        if dockerfile is not None:
            yield name, service, dockerfile


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def settings_from_env(
    cls: type[BaseSettings], env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch
) -> BaseSettings:
    """`cls()` in an environment holding exactly `env` of the GPUPLANE_* variables."""
    for key in list(os.environ):
        if key.upper().startswith("GPUPLANE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.upper().startswith("GPUPLANE_"):
            monkeypatch.setenv(key, value)
    return cls()


# ---- compose: structure


def test_compose_has_the_whole_stack(services: dict[str, Any], compose: dict[str, Any]) -> None:
    expected = {*NATS_NODES, "postgres", "minio", "minio-setup", "migrate"}
    expected |= {"controlplane-1", "controlplane-2", "daemon"}
    assert expected <= set(services)
    volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert spec["condition"] in DEPENDENCY_CONDITIONS, (name, dependency)
        for mount in service.get("volumes") or []:
            source, _, rest = str(mount).partition(":")
            assert rest, f"{name}: volume {mount!r} has no target"
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            elif not source.startswith("/"):
                assert source in volumes, f"{name} uses undeclared volume {source}"


def test_waited_for_services_have_healthchecks(
    services: dict[str, Any], dockerfiles: dict[str, Dockerfile]
) -> None:
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            target = services[dependency]
            if spec["condition"] == "service_healthy":
                check = target.get("healthcheck")
                dockerfile = dockerfile_of(target)
                inherited = dockerfile and dockerfiles[dockerfile].final.last("HEALTHCHECK")
                assert (check and not check.get("disable")) or inherited, (name, dependency)
            if spec["condition"] == "service_completed_successfully":
                assert target.get("restart") == "no", f"{dependency} is a one-shot"


def test_nats_nodes_form_one_cluster_with_synced_file_storage(
    services: dict[str, Any], nats_conf: dict[str, Any]
) -> None:
    jetstream, cluster = nats_conf["jetstream"], nats_conf["cluster"]
    # JetStream's default flush interval loses acknowledged messages on power loss.
    assert jetstream["sync_interval"] == "always"
    _, cluster_port = host_port(cluster["listen"])
    routes = {urlsplit(route).netloc for route in cluster["routes"]}
    assert routes == {f"{node}:{cluster_port}" for node in NATS_NODES}
    assert nats_conf["server_name"] == "$NATS_SERVER_NAME"
    names = set()
    for node in NATS_NODES:
        service = services[node]
        mounts = [str(m) for m in service["volumes"]]
        config_target = next(m.split(":")[1] for m in mounts if m.startswith("./nats/nats.conf:"))
        command = service["command"]
        assert command[command.index("-c") + 1] == config_target
        store = next(m for m in mounts if not m.startswith("."))
        volume_target = store.split(":")[1]
        store_dir = str(jetstream["store_dir"])
        assert store_dir == volume_target or store_dir.startswith(volume_target + "/"), node
        names.add(service_environment(service)["NATS_SERVER_NAME"])
        assert "depends_on" not in service, "a node waiting for another never forms a quorum"
    assert names == set(NATS_NODES)


def test_control_planes_share_the_database_and_list_every_nats_node(
    services: dict[str, Any], nats_conf: dict[str, Any], dockerfiles: dict[str, Dockerfile]
) -> None:
    planes = [services["controlplane-1"], services["controlplane-2"]]
    envs = [service_environment(plane) for plane in planes]
    image_env = dockerfiles["deploy/Dockerfile.controlplane"].final.env()
    urls = {env["GPUPLANE_DATABASE_URL"] for env in envs}
    assert len(urls) == 1
    assert service_environment(services["migrate"])["GPUPLANE_DATABASE_URL"] in urls
    database = urlsplit(urls.pop())
    assert database.scheme == "postgresql+psycopg"
    assert database.hostname == "postgres"
    _, client_port = host_port(nats_conf["listen"])
    for env, plane in zip(envs, planes, strict=True):
        servers = [urlsplit(url.strip()) for url in env["GPUPLANE_NATS_URL"].split(",")]
        assert {(s.hostname, s.port) for s in servers} == {(n, client_port) for n in NATS_NODES}
        assert int(env["GPUPLANE_NATS_STREAM_REPLICAS"]) == len(NATS_NODES)
        assert env["GPUPLANE_S3_ENDPOINT"].split(":")[0] == "minio"
        listen = env.get("GPUPLANE_LISTEN_ADDR", image_env.get("GPUPLANE_LISTEN_ADDR", ""))
        assert listen.startswith("0.0.0.0:"), "a container must listen on all interfaces"
        published = {str(p).rsplit(":", 1)[1] for p in plane["ports"]}
        assert str(host_port(listen)[1]) in published
        depends = plane["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        for node in NATS_NODES:
            assert depends[node]["condition"] == "service_healthy"
        assert "controlplane" in plane["networks"]["default"]["aliases"]


def test_daemon_gets_the_gpus_the_docker_socket_and_the_host_pids(
    services: dict[str, Any],
) -> None:
    daemon = services["daemon"]
    devices = daemon["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert daemon["pid"] == "host"
    mounts = [str(m).split(":") for m in daemon["volumes"]]
    assert ["/var/run/docker.sock", "/var/run/docker.sock"] in mounts
    env = service_environment(daemon)
    data_dir = env["GPUPLANE_DAEMON_DATA_DIR"]
    # Job containers bind-mount from the data dir through the host's engine.
    assert [data_dir, data_dir] in [m[:2] for m in mounts]
    host, port = host_port(env["GPUPLANE_DAEMON_CONTROL_PLANE"])
    planes = [services["controlplane-1"], services["controlplane-2"]]
    assert all(host in p["networks"]["default"]["aliases"] for p in planes)
    assert port == 50051


def test_object_storage_credentials_and_bucket_agree(services: dict[str, Any]) -> None:
    setup = service_environment(services["minio-setup"])
    policy = json.loads((DEPLOY / "minio" / "gpuplane-bucket.json").read_text())
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {f"arn:aws:s3:::{setup['BUCKET']}", f"arn:aws:s3:::{setup['BUCKET']}/*"}
    mounts = [str(m) for m in services["minio-setup"]["volumes"]]
    assert "./minio/gpuplane-bucket.json:/gpuplane-bucket.json:ro" in mounts
    for name in ("controlplane-1", "controlplane-2"):
        env = service_environment(services[name])
        assert env["GPUPLANE_S3_BUCKET"] == setup["BUCKET"], name
        assert env["GPUPLANE_S3_ACCESS_KEY"] == setup["CONTROLPLANE_S3_ACCESS_KEY"], name
        assert env["GPUPLANE_S3_SECRET_KEY"] == setup["CONTROLPLANE_S3_SECRET_KEY"], name
        assert env["GPUPLANE_S3_ENDPOINT"] == urlsplit(setup["S3_URL"]).netloc, name
    # Daemons hold no S3 key (each dispatch carries its attempt's grant); none is made for them.
    assert not [key for key in service_environment(services["daemon"]) if "S3" in key]
    assert not [key for key in setup if key.startswith("DAEMON_S3")]


# ---- every GPUPLANE_* variable is a setting, and its value is valid


def gpuplane_variables(env: Mapping[str, str]) -> set[str]:
    return {key.upper() for key in env if key.upper().startswith("GPUPLANE_")}


def unknown_variables(env: Mapping[str, str], cls: type[BaseSettings]) -> set[str]:
    return gpuplane_variables(env) - set(env_names(cls))


def test_every_variable_in_compose_is_a_setting_of_its_image(services: dict[str, Any]) -> None:
    seen = set()
    for name, service, dockerfile in gpuplane_services(services):
        cls = IMAGES[dockerfile]
        env = service_environment(service)
        assert not unknown_variables(env, cls), f"{name}: not in {cls.__name__}"
        seen.add(dockerfile)
    assert seen == set(IMAGES), "each image is used"
    for name, service in services.items():
        if dockerfile_of(service) is None:
            assert not gpuplane_variables(service_environment(service)), name


def test_every_variable_in_the_dockerfiles_is_a_setting(
    dockerfiles: dict[str, Dockerfile],
) -> None:
    for name, dockerfile in dockerfiles.items():
        for stage in dockerfile.stages:
            assert not unknown_variables(stage.env(), IMAGES[name]), name


@pytest.mark.parametrize("example", sorted(ENV_EXAMPLES))
def test_env_example_documents_exactly_the_settings(example: str) -> None:
    cls = ENV_EXAMPLES[example]
    env = read_env_file(DEPLOY / example)
    shown = {**env.values, **env.commented}
    assert not unknown_variables(shown, cls)
    missing = set(env_names(cls)) - {key.upper() for key in shown}
    assert not missing, f"{example} does not document {sorted(missing)}"


@pytest.mark.parametrize("example", sorted(ENV_EXAMPLES))
def test_env_example_values_are_valid(example: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cls = ENV_EXAMPLES[example]
    env = read_env_file(DEPLOY / example)
    settings_from_env(cls, env.values, monkeypatch)
    # Every value shown commented out (a default or a sample) is valid too.
    shown = {key: value for key, value in env.commented.items() if value}
    settings_from_env(cls, {**env.values, **shown}, monkeypatch)


def test_compose_settings_are_valid(
    services: dict[str, Any], dockerfiles: dict[str, Dockerfile], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service, dockerfile in gpuplane_services(services):
        env = dockerfiles[dockerfile].final.env()
        env.update(service_environment(service))
        try:
            settings = settings_from_env(IMAGES[dockerfile], env, monkeypatch)
        except ValidationError as exc:
            pytest.fail(f"{name}: {exc}")
        if isinstance(settings, Settings) and name.startswith("controlplane"):
            assert settings.nats_stream_replicas == 3
            assert settings.bootstrap_admin_key is not None


def test_compose_variables_are_in_its_env_example() -> None:
    used = compose_variables(COMPOSE.read_text())
    documented = set(compose_example_variables())
    assert used - documented == set(), "used in compose.yaml, missing in compose.env.example"
    assert documented - used == set(), "in compose.env.example, unused by compose.yaml"


def test_env_examples_are_up_to_date() -> None:
    done = subprocess.run(
        [sys.executable, str(DEPLOY / "gen-env-examples"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---- Dockerfiles


def installed_packages() -> set[str]:
    """Top-level package dirs (relative to the root) that `pip install .` puts in the wheel,
    from pyproject's [tool.setuptools.packages.find]."""
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    find = find["packages"]["find"]
    found = set()
    for where in find.get("where", ["."]):
        for candidate in (ROOT / where).iterdir():
            if not (candidate / "__init__.py").is_file():
                continue
            if any(fnmatch.fnmatchcase(candidate.name, p) for p in find.get("include", ["*"])):
                found.add(str(candidate.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_dockerfile_builds_the_package_from_files_in_the_context(
    name: str, dockerfiles: dict[str, Dockerfile]
) -> None:
    dockerfile = dockerfiles[name]
    rules = dockerignore(ROOT / f"{name}.dockerignore")
    stage_names: set[str] = set()
    copied: set[str] = set()
    for stage in dockerfile.stages:
        for instruction in stage.all("COPY") + stage.all("ADD"):
            copy = parse_copy(instruction)
            if copy.from_stage is not None:
                assert copy.from_stage in stage_names, f"line {copy.line}: no earlier stage"
                continue
            for source in copy.sources:
                path = ROOT / source
                assert path.exists(), f"line {copy.line}: {source} is not in the repository"
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                for file in files:
                    relative = str(file.relative_to(ROOT))
                    if "__pycache__" in relative or relative.endswith(".pyc"):
                        continue
                    assert not ignored(relative, rules), f"{relative} is left out of the context"
                if path.is_dir():
                    # The layout is kept: pyproject finds the packages where it expects them.
                    assert posixpath.normpath(copy.dest).endswith(source.rstrip("/")), copy
                copied.add(source.rstrip("/"))
        if stage.name:
            stage_names.add(stage.name)
    assert {"pyproject.toml", "README.md"} <= copied
    missing = {p for p in installed_packages() if not any(p.startswith(c) for c in copied)}
    assert not missing, f"the image would install without {sorted(missing)}"


def test_dockerfiles_run_the_right_process(dockerfiles: dict[str, Dockerfile]) -> None:
    plane = dockerfiles["deploy/Dockerfile.controlplane"]
    daemon = dockerfiles["deploy/Dockerfile.daemon"]
    for dockerfile, command in ((plane, ["controlplane", "serve"]), (daemon, ["daemon", "run"])):
        final = dockerfile.final
        entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
        assert entrypoint is not None
        assert cmd is not None
        entry_args, cmd_args = entrypoint.json_args(), cmd.json_args()
        # The exec form, so that SIGTERM reaches the process, not a shell.
        assert entry_args is not None
        assert cmd_args is not None
        assert entry_args + cmd_args == ["gpuplane", *command]
        assert final.last("HEALTHCHECK") is not None
    # The control plane runs unprivileged; its ports are the ones its settings name.
    user = plane.final.last("USER")
    assert user is not None
    assert user.args not in ("root", "0")
    env = plane.final.env()
    exposed = {int(port) for i in plane.final.all("EXPOSE") for port in i.args.split()}
    assert exposed == {
        host_port(env["GPUPLANE_LISTEN_ADDR"])[1],
        host_port(env["GPUPLANE_METRICS_ADDR"])[1],
    }
    # The daemon's base is NVIDIA's CUDA image (NVML comes from the host's driver).
    assert all(stage.base.startswith("nvidia/cuda:") for stage in daemon.stages)


def test_healthchecks_are_commands() -> None:
    for name in IMAGES:
        check = parse_dockerfile(ROOT / name).final.last("HEALTHCHECK")
        assert check is not None
        assert healthcheck_command(check), name


def test_systemd_unit_reads_the_file_the_daemon_example_describes() -> None:
    unit = (DEPLOY / "gpuplane-daemon.service").read_text().splitlines()
    header = (DEPLOY / "daemon.env.example").read_text().splitlines()[0]
    env_file = next(line for line in unit if line.startswith("EnvironmentFile="))
    assert env_file.removeprefix("EnvironmentFile=") in header


def test_shell_scripts_parse() -> None:
    for script in (DEPLOY / "install-daemon.sh", DEPLOY / "minio" / "setup.sh"):
        shell = "bash" if script.read_text().startswith("#!/usr/bin/env bash") else "sh"
        done = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
