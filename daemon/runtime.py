"""Runs job containers with the Docker SDK: GPUs by UUID, hardening, limits, logs, exit info."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Awaitable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.containers import Container, _create_container_args
from docker.types import DeviceRequest
from gpuplane.v1 import messaging_pb2, registry_pb2, types_pb2

from daemon import dockerlogs
from daemon.logstream import LogFollower
from daemon.preflight import userns_remapped
from daemon.sessions import authorized_keys_tar
from daemon.settings import DaemonSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

LABEL_JOB = "gpuplane.job"
LABEL_ATTEMPT = "gpuplane.attempt"
LABEL_HOST = "gpuplane.host"
# Users that are root inside a container (an image's empty USER is root too).
_ROOT_USERS = frozenset({"", "0", "root"})
# How long an exit by SIGKILL under a memory limit waits for Docker's OOM flag (inspect_exited).
OOM_SETTLE = 1.0
# Where a job may write besides /output and /dev/shm: a tmpfs of settings.scratch_bytes.
SCRATCH = "/tmp"
# A verification probe's container (never a job's: orphan sweeps leave it alone).
LABEL_PROBE = "gpuplane.probe"
# Env names a job may not set: they decide which GPUs the NVIDIA hook exposes.
_RESERVED_ENV = re.compile(r"^(NVIDIA_VISIBLE_DEVICES|NVIDIA_MIG_\w+|GPUPLANE_\w+)$")
_DOCKER_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


class ImageUnavailable(Exception):
    """The job's image is not on this host and the registry refused it (not found, denied,
    a bad reference): the job's fault; the message says why."""


class ImagePullFailed(Exception):
    """The job's image is not on this host and pulling it failed for the host's reasons (the
    registry unreachable from here, a registry or engine error): the host's fault, retried
    elsewhere; the message says why."""


# HTTP statuses of the engine's pull answer that put the image, not the host, at fault: a bad
# reference (400), credentials the image needs (401, 403), no such repository or tag (404).
# The engine answers 500 when it could not reach or read the registry.
_USER_PULL_STATUSES = frozenset({400, 401, 403, 404})


class ContainerError(Exception):
    """The container could not be created or started; the message says why."""


@dataclass(frozen=True)
class ExitInfo:
    """How a container ended, from `docker inspect`."""

    exit_code: int
    oom_killed: bool
    run_time_ms: int
    error: str = ""
    # Docker's State.Status: "created", "running", "exited", ...
    status: str = ""
    # Whether the container ever started (State.StartedAt is set).
    started: bool = True
    # The memory limit it ran under (HostConfig.Memory; 0: none).
    memory_limit_bytes: int = 0


@dataclass(frozen=True)
class EngineFacts:
    """What the Docker engine says of the machine jobs run on (`docker info`)."""

    cpus: int
    memory_bytes: int
    # Whether the engine remaps users (userns-remap): root inside is not root on the host.
    userns: bool


def engine_facts(info: dict[str, Any]) -> EngineFacts:
    return EngineFacts(
        cpus=int(info.get("NCPU") or os.cpu_count() or 1),
        memory_bytes=int(info.get("MemTotal") or 0),
        userns=userns_remapped(info),
    )


def parse_docker_time(value: str) -> datetime | None:
    """Docker's RFC 3339 times carry nanoseconds; the zero time means "never"."""
    match = _DOCKER_TIME.match(value or "")
    if match is None or value.startswith("0001-"):
        return None
    whole, fraction, zone = match.groups()
    micros = (fraction or "0")[:6].ljust(6, "0")
    zone = "+00:00" if zone == "Z" else zone
    return datetime.fromisoformat(f"{whole}.{micros}{zone}")


def short_reason(exc: BaseException) -> str:
    """The first line of a Docker error's explanation, bounded for a user-facing reason."""
    text = str(getattr(exc, "explanation", None) or exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


async def quietly(work: Awaitable[T]) -> T | None:
    """Cleanup that must not mask the outcome: errors are logged, not raised."""
    try:
        return await work
    except (DockerException, OSError, TimeoutError) as exc:
        log.warning("cleanup step failed: %s", exc)
        return None


def container_name(job_id: str, attempt: int) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]", "_", f"gpuplane-{job_id}-{attempt}")


class DockerRuntime:
    """Creates, watches and removes job containers on one Docker engine.

    Short SDK calls run through asyncio.to_thread; calls that block for a job's lifetime
    (wait, following logs) run on this runtime's own threads, so that many running jobs
    cannot starve the default executor that S3 and the other SDK calls share.
    """

    def __init__(
        self,
        client: docker.DockerClient,
        settings: DaemonSettings,
        *,
        host_id: str = "",
        simulated_gpus: bool = False,
        gpu_count: int = 1,
        facts: EngineFacts | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.host_id = host_id
        mode = settings.gpu_device_requests
        self.device_requests = mode == "always" or (mode == "auto" and not simulated_gpus)
        self._long = ThreadPoolExecutor(
            max_workers=3 * settings.max_concurrent_jobs + 2, thread_name_prefix="gpuplane-docker"
        )
        self.gpu_count = max(gpu_count, 1)
        # The engine's facts; None: asked of the engine on first use.
        self._facts = facts

    def facts(self) -> EngineFacts:
        """The engine's CPUs, memory and user remapping, asked once (blocking)."""
        if self._facts is None:
            self._facts = engine_facts(self.client.info())
        return self._facts

    def close(self) -> None:
        self._long.shutdown(wait=False, cancel_futures=True)

    async def ensure_image(self, image: str) -> dict[str, Any]:
        """Makes sure `image` is local, pulling it if needed, and returns its `docker image
        inspect` (one call when it is here: create() and image_identity() take it instead of
        asking again). Raises ImageUnavailable when the registry refused the image (the
        engine answered 4xx) and ImagePullFailed when the pull failed for the host's reasons
        (5xx: registry unreachable; or no answer)."""
        if not image:
            raise ImageUnavailable("the job names no container image")

        def ensure() -> dict[str, Any]:
            try:
                return dict(self.client.api.inspect_image(image))
            except ImageNotFound:
                pass
            try:
                return dict(self.client.images.pull(image).attrs)
            except (DockerException, OSError) as exc:
                why = f"image '{image}' is not on this host and could not be pulled: "
                if isinstance(exc, APIError) and exc.status_code in _USER_PULL_STATUSES:
                    raise ImageUnavailable(why + short_reason(exc)) from exc
                raise ImagePullFailed(why + short_reason(exc)) from exc

        return await asyncio.to_thread(ensure)

    async def image_identity(
        self, image: str, attrs: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The local image's content digest (its config's sha256, Docker's image id) and the
        registry digests it was pulled by: what provenance names instead of a mutable tag;
        from `attrs` (its inspect, as ensure_image returned it) when given."""
        if attrs is None:
            attrs = dict(await asyncio.to_thread(self.client.api.inspect_image, image))
        return {
            "reference": image,
            "digest": str(attrs.get("Id", "")),
            "repo_digests": sorted(attrs.get("RepoDigests") or []),
        }

    def container_config(
        self, dispatch: messaging_pb2.DispatchMessage, work_dir: Path, image_user: str = ""
    ) -> dict[str, Any]:
        """The keyword arguments of `containers.create` for one attempt (blocking: asks the
        engine for its facts once); `image_user` is the image's USER."""
        spec = dispatch.spec
        uuids = list(dispatch.gpu_uuids)
        facts = self.facts()
        env = {k: v for k, v in spec.env.items() if not _RESERVED_ENV.match(k)}
        # Caches (pip, torch, Hugging Face) go to the scratch: the root filesystem is read-only.
        env.setdefault("XDG_CACHE_HOME", f"{SCRATCH}/.cache")
        env["NVIDIA_VISIBLE_DEVICES"] = ",".join(uuids) if uuids else "void"
        env["GPUPLANE_JOB_ID"] = dispatch.job_id
        env["GPUPLANE_ATTEMPT"] = str(dispatch.attempt)
        config: dict[str, Any] = {
            "name": container_name(dispatch.job_id, dispatch.attempt),
            "command": list(spec.args) or None,
            "entrypoint": list(spec.command) or None,
            "environment": env,
            "labels": {
                LABEL_JOB: dispatch.job_id,
                LABEL_ATTEMPT: str(dispatch.attempt),
                LABEL_HOST: self.host_id,
            },
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "pids_limit": self.settings.default_pids_limit,
            "shm_size": spec.shm_bytes or self.settings.default_shm_bytes,
            "read_only": True,
            "tmpfs": {SCRATCH: f"rw,nosuid,nodev,size={self.settings.scratch_bytes}"},
            "network_mode": "bridge" if spec.network == types_pb2.NETWORK_MODE_BRIDGE else "none",
            "volumes": {
                str(work_dir / "output"): {"bind": "/output", "mode": "rw"},
                str(work_dir / "input"): {"bind": "/input", "mode": "ro"},
            },
        }
        if spec.HasField("session"):
            # A shell stays up on a terminal with open stdin; its filesystem is the user's
            # to change (and takes the SSH keys: put_archive refuses a read-only root).
            config.update(tty=True, stdin_open=True, read_only=False)
        share = max(spec.gpu_count, 1) / self.gpu_count  # of the machine, by GPUs
        memory = spec.memory_bytes or self.settings.default_memory_bytes
        memory = memory or int(facts.memory_bytes * min(share, 1.0))
        if memory:
            config["mem_limit"] = memory
            config["memswap_limit"] = memory  # no swap beyond the limit
        millicores = spec.cpu_millicores or self.settings.default_cpu_millicores
        millicores = millicores or int(facts.cpus * 1000 * share)
        # Docker refuses more CPUs than the machine has; the scheduler's view may differ.
        config["nano_cpus"] = max(min(millicores * 1_000_000, facts.cpus * 10**9), 10**7)
        if not facts.userns and image_user.partition(":")[0] in _ROOT_USERS:
            # No remapping: root in the container would be the host's root.
            config["user"] = self.settings.job_user
        if uuids and self.device_requests:
            config["device_requests"] = [
                DeviceRequest(driver="nvidia", device_ids=uuids, capabilities=[["gpu"]])
            ]
        return config

    async def create(
        self,
        dispatch: messaging_pb2.DispatchMessage,
        work_dir: Path,
        image: Mapping[str, Any] | None = None,
    ) -> Container:
        """Creates (does not start) the attempt's container from its image's inspect `image`
        (asked here when None); a leftover of the same name from an earlier run of this
        attempt is removed first. Raises ContainerError.

        One API call: the SDK's containers.create() inspects the container it made, but
        what this daemon needs of it (id, name, whether it has a terminal) it already knows."""

        def create() -> Container:
            attrs = (
                image if image is not None else self.client.api.inspect_image(dispatch.spec.image)
            )
            user = str((attrs.get("Config") or {}).get("User") or "")
            config = self.container_config(dispatch, work_dir, user)
            try:
                container = self._create(dispatch.spec.image, config)
            except APIError as exc:
                if exc.status_code != 409:
                    raise
                self.client.api.remove_container(config["name"], force=True)
                container = self._create(dispatch.spec.image, config)
            keys = list(dispatch.spec.session.ssh_public_keys)
            if keys and not container.put_archive("/", authorized_keys_tar(keys)):
                raise ContainerError("the session's SSH keys could not be written")
            return container

        try:
            return await asyncio.to_thread(create)
        except (DockerException, OSError) as exc:
            raise ContainerError(
                f"the container could not be created: {short_reason(exc)}"
            ) from exc

    def _create(self, image: str, config: dict[str, Any]) -> Container:
        """containers.create() without its inspect of the new container (blocking)."""
        api = self.client.api
        kwargs = {**config, "image": image, "version": api._version}
        created = api.create_container(**_create_container_args(kwargs))
        attrs = {"Id": created["Id"], "Name": f"/{config['name']}"}
        attrs["Config"] = {"Image": image, "Tty": bool(config.get("tty"))}
        return self.client.containers.prepare_model(attrs)

    async def start(self, container: Container) -> None:
        try:
            await asyncio.to_thread(container.start)
        except (DockerException, OSError) as exc:
            raise ContainerError(f"the container could not start: {short_reason(exc)}") from exc

    async def run(self, dispatch: messaging_pb2.DispatchMessage, work_dir: Path) -> Container:
        """Image check (pull if absent), create and start; the container is running after."""
        await self.ensure_image(dispatch.spec.image)
        container = await self.create(dispatch, work_dir)
        try:
            await self.start(container)
        except ContainerError:
            await self.stop(container)
            raise
        return container

    async def run_probe(
        self, command: registry_pb2.ProbeCommand, work_dir: Path
    ) -> tuple[int | None, bytes]:
        """Runs a verification probe as jobs run (same limits, GPU passthrough of the
        challenged GPUs, no network), its products written under work_dir/output; returns its
        exit code (None: still running at the deadline, then killed) and its log's tail. The
        container is removed either way. Raises what `run` raises."""
        dispatch = messaging_pb2.DispatchMessage(
            job_id=f"probe-{command.probe_id}",
            gpu_uuids=command.gpu_uuids,
            spec=types_pb2.JobSpec(image=command.image),
        )
        await self.ensure_image(command.image)
        config = self.container_config(dispatch, work_dir)
        config["name"] = f"gpuplane-probe-{command.probe_id}"
        config["labels"] = {LABEL_PROBE: str(command.probe_id)}
        config["environment"].update(
            GPUPLANE_PROBE_N=str(command.n),
            GPUPLANE_PROBE_ROUNDS=str(command.rounds),
            GPUPLANE_PROBE_SEEDS=",".join(seed.hex() for seed in command.seeds),
        )

        def create() -> Container:
            with contextlib.suppress(NotFound):
                self.client.api.remove_container(config["name"], force=True)
            return self.client.containers.create(command.image, **config)

        try:
            container = await asyncio.to_thread(create)
        except (DockerException, OSError) as exc:
            raise ContainerError(f"the probe could not be created: {short_reason(exc)}") from exc
        try:
            await self.start(container)
            code = await self.wait(container, command.deadline_ms / 1000)
            _, stderr = await self.logs(container)
            return code, stderr[-500:]
        finally:
            await self.stop(container)

    async def wait(self, container: Container, timeout: float | None = None) -> int | None:
        """The exit code once the container has exited; None if `timeout` passed first."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._long, lambda: container.wait()["StatusCode"])
        # On timeout or cancellation the thread runs on until the container stops; whatever
        # it ends with then is nobody's business (and must not be logged as unretrieved).
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return int(await asyncio.wait_for(asyncio.shield(future), timeout))
        except TimeoutError:
            return None

    async def kill(self, container: Container) -> None:
        """SIGKILL; a container that already stopped or is gone is fine."""
        try:
            await asyncio.to_thread(container.kill)
        except NotFound:
            pass
        except APIError as exc:
            if exc.status_code != 409:  # 409: not running
                raise

    async def stop(self, container: Container) -> None:
        """Kills and removes the container (with its anonymous volumes) in one call."""
        try:
            await asyncio.to_thread(container.remove, force=True, v=True)
        except NotFound:
            pass
        except APIError as exc:
            if exc.status_code != 409:  # 409: removal already in progress
                raise

    async def inspect(self, container: Container) -> ExitInfo:
        """Exit code, OOM kill and run time (StartedAt → FinishedAt, or → now if running)."""
        info = await asyncio.to_thread(self.client.api.inspect_container, container.id)
        state = info.get("State", {})
        memory_limit = int((info.get("HostConfig") or {}).get("Memory") or 0)
        started = parse_docker_time(state.get("StartedAt", ""))
        finished = parse_docker_time(state.get("FinishedAt", "")) or datetime.now(UTC)
        run_time_ms = 0
        if started is not None:
            run_time_ms = max(0, int((finished - started).total_seconds() * 1000))
        return ExitInfo(
            exit_code=int(state.get("ExitCode", 0)),
            oom_killed=bool(state.get("OOMKilled", False)),
            run_time_ms=run_time_ms,
            error=str(state.get("Error", "")),
            status=str(state.get("Status", "")),
            started=started is not None,
            memory_limit_bytes=memory_limit,
        )

    async def inspect_exited(self, container: Container, settle: bool = True) -> ExitInfo:
        """inspect() of an exited container; with `settle` (it exited by itself, not killed by
        this daemon) looked at again for up to OOM_SETTLE seconds when it was SIGKILLed (137)
        under a memory limit and Docker does not say OOM yet:
        containerd reports a cgroup's OOM kill apart from the exit, at times after it, and
        Docker sets OOMKilled only then (a job killed for memory must say so, not "exit code
        137")."""
        info = await self.inspect(container)
        deadline = asyncio.get_running_loop().time() + OOM_SETTLE
        while (
            settle
            and info.exit_code == 137
            and not info.oom_killed
            and info.memory_limit_bytes
            and asyncio.get_running_loop().time() < deadline
        ):
            await asyncio.sleep(0.05)
            info = await self.inspect(container)
        return info

    async def logs(self, container: Container) -> tuple[bytes, bytes]:
        """Everything the container wrote so far: (stdout, stderr)."""
        stdout, stderr = await asyncio.gather(
            asyncio.to_thread(container.logs, stdout=True, stderr=False),
            asyncio.to_thread(container.logs, stdout=False, stderr=True),
        )
        return bytes(stdout), bytes(stderr)

    def follow_logs(
        self, container: Container, from_now: bool = False, since: float | None = None
    ) -> LogFollower:
        """Streams ("stdout" | "stderr", chunk) from the start (or, `from_now`, only what is
        written from now on; `since`: from that Unix time) until the container stops: both
        streams on one connection read by one thread (daemon/dockerlogs.py)."""
        tail: int | str = 0 if from_now and since is None else "all"
        container_id = container.id or ""
        tty = bool((container.attrs.get("Config") or {}).get("Tty"))

        def source() -> Iterable[tuple[str, bytes]]:
            return dockerlogs.follow_logs(
                self.client.api, container_id, tty=tty, tail=tail, since=since
            )

        return LogFollower([source], self._long)

    def job_containers(self) -> dict[str, str]:
        """{container id: job id} of this host's running job containers (blocking: one
        API call, no inspect per container)."""
        wanted = [LABEL_JOB, f"{LABEL_HOST}={self.host_id}"] if self.host_id else [LABEL_JOB]
        listed = self.client.api.containers(filters={"label": wanted})
        return {c["Id"]: (c.get("Labels") or {}).get(LABEL_JOB, "") for c in listed}

    async def find_by_label(self, **labels: str) -> list[Container]:
        """Containers (running or not) carrying all of `labels` (keys without "gpuplane.")."""
        wanted = [f"gpuplane.{k}={v}" for k, v in labels.items()] or ["gpuplane.job"]
        return await asyncio.to_thread(self._list_labelled, wanted)

    def _list_labelled(self, wanted: list[str]) -> list[Container]:
        # containers.list() inspects each listed container and fails whole when one is
        # removed between the list and its inspect (a job ending meanwhile): skip those.
        found = []
        for listed in self.client.api.containers(all=True, filters={"label": wanted}):
            try:
                found.append(self.client.containers.get(listed["Id"]))
            except NotFound:
                continue
        return found
