"""The hardware verification probe: the control plane's challenge run as a container on the
challenged GPUs, as jobs run, and each GPU's product sent back on the Connect stream."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

from gpuplane.v1 import registry_pb2, types_pb2

from daemon.runtime import ContainerError, DockerRuntime, ImagePullFailed, ImageUnavailable

log = logging.getLogger(__name__)
Send = Callable[[registry_pb2.DaemonMessage], bool]


async def run_probe(
    runtime: DockerRuntime, work_root: Path, command: registry_pb2.ProbeCommand, send: Send
) -> None:
    """Runs the probe and sends one ProbeAnswer per seed (or one with `error`)."""
    work = work_root / f"probe-{command.probe_id}"
    try:
        answers = await _answers(runtime, work, command)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
    for answer in answers:
        if not send(registry_pb2.DaemonMessage(probe_answer=answer)):
            log.warning("probe %d: not connected; its answers are lost", command.probe_id)
            return
    log.info("probe %d: %d answer(s) sent", command.probe_id, len(answers))


async def _answers(
    runtime: DockerRuntime, work: Path, command: registry_pb2.ProbeCommand
) -> list[registry_pb2.ProbeAnswer]:
    def failed(why: str) -> list[registry_pb2.ProbeAnswer]:
        log.warning("probe %d failed: %s", command.probe_id, why)
        return [registry_pb2.ProbeAnswer(probe_id=command.probe_id, error=why)]

    output = work / "output"
    await asyncio.to_thread(_prepare, work)
    try:
        code, stderr = await runtime.run_probe(command, work)
    except (ContainerError, ImageUnavailable, ImagePullFailed) as error:
        return failed(str(error))
    if code is None:
        return failed(f"the probe did not finish within {command.deadline_ms} ms")
    if code != 0:
        return failed(f"the probe exited with {code}: {stderr.decode(errors='replace')}")
    answers = []
    for index in range(len(command.seeds)):
        path = output / f"product-{index}.bin"
        if not path.is_file():
            return failed(f"the probe wrote no product for GPU {index}")
        data = await asyncio.to_thread(path.read_bytes)
        product = await asyncio.to_thread(zlib.compress, data, 1)
        answer = registry_pb2.ProbeAnswer(probe_id=command.probe_id, index=index, product=product)
        seen = _seen(output / f"gpu-{index}.json")
        if seen is not None:
            answer.gpu.CopyFrom(seen)
        answers.append(answer)
    return answers


def _seen(path: Path) -> types_pb2.Gpu | None:
    """What the probe container saw of its GPU (gpu-<i>.json), if it said."""
    try:
        facts = json.loads(path.read_text())
        return types_pb2.Gpu(
            name=str(facts["name"])[:200], memory_total_bytes=int(facts["memory_total_bytes"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _prepare(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    (work / "output").mkdir(parents=True)
    (work / "input").mkdir()
    # The container may run as another user (user-namespace remapping): it must write here.
    (work / "output").chmod(0o777)
