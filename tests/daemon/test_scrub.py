"""The GPU scrub through the real pynvml against the fake libnvidia-ml.so.1 (a child process:
the loader reads LD_LIBRARY_PATH at start): baselines at start, a clean attestation, a leftover
process and leftover memory quarantining the GPU, release once it reads clean; and the
executor's terminal report carrying the attestation of the dispatch's GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpuplane.v1 import messaging_pb2

from daemon.executor import JobExecutor
from daemon.runtime import DockerRuntime
from daemon.scrub import Scrubber, SimulatedReader
from daemon.settings import DaemonSettings
from storage.objects import ObjectStore
from tests.daemon.conftest import Reports, make_dispatch

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).parent.parent.parent
H100 = "GPU-fa4e0000-0000-0000-0000-000000000000"
RTX = "GPU-fa4e0000-0000-0000-0000-000000000001"
MIB = 1 << 20
# A Scrubber on NvmlReader in a child, one JSON line per command: "calibrate", "check UUID..."
# (the attestation), "recheck" (released GPUs and the quarantine), "quit".
_DRIVER = """
import asyncio, json, sys
from google.protobuf.json_format import MessageToDict
from daemon.scrub import NvmlReader, Scrubber

scrubber = Scrubber(NvmlReader(), timeout=float(sys.argv[1]), slack_bytes=64 << 20)
loop = asyncio.new_event_loop()
print(json.dumps("ready"), flush=True)
for line in sys.stdin:
    command = line.split()
    if command[0] == "calibrate":
        loop.run_until_complete(scrubber.calibrate(command[1:]))
        print(json.dumps({"baseline": scrubber.baseline, "quarantined": scrubber.quarantined}),
              flush=True)
    elif command[0] == "check":
        attestation = loop.run_until_complete(scrubber.check(command[1:]))
        print(json.dumps({"attestation": MessageToDict(attestation,
              preserving_proto_field_name=True), "quarantined": scrubber.quarantined}), flush=True)
    elif command[0] == "recheck":
        released = loop.run_until_complete(scrubber.recheck())
        print(json.dumps({"released": released, "quarantined": scrubber.quarantined}), flush=True)
    else:
        break
"""


class Child:
    def __init__(self, library: Path, state: Path, timeout: float) -> None:
        self.state = state
        env = {**os.environ, "LD_LIBRARY_PATH": str(library), "FAKE_NVML_STATE": str(state)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _DRIVER, str(timeout)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=ROOT,
            text=True,
        )
        assert self.ask("") == "ready"

    def ask(self, command: str) -> Any:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        if command:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the scrub child died (exit {self.process.poll()})"
        return json.loads(line)

    def set(self, **values: object) -> None:
        """Rewrites the fake library's state file (renamed into place)."""
        text = "".join(f"{k.replace('__', '.')}={v}\n" for k, v in values.items())
        temporary = self.state.with_suffix(".tmp")
        temporary.write_text(text)
        os.replace(temporary, self.state)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("quit\n")
        self.process.stdin.close()
        assert self.process.wait(timeout=10) == 0


@pytest.fixture
def child(fake_nvml: Path, tmp_path: Path) -> Iterator[Child]:
    running = Child(fake_nvml, tmp_path / "nvml.state", timeout=0.6)
    try:
        yield running
    finally:
        running.close()


def test_leftover_process_or_memory_quarantines_until_clean(child: Child) -> None:
    # Idle at start: the driver's own 500 MiB on the H100, 300 MiB on the RTX.
    child.set(**{"0.mem_used": 500 * MIB, "1.mem_used": 300 * MIB})
    calibrated = child.ask(f"calibrate {H100} {RTX}")
    assert calibrated == {"baseline": {H100: 500 * MIB, RTX: 300 * MIB}, "quarantined": {}}

    # An attempt that left nothing: clean, with what was read.
    clean = child.ask(f"check {H100}")["attestation"]
    assert clean["clean"] is True
    assert clean["measured"] is True
    assert clean["gpus"] == [
        {
            "gpu_uuid": H100,
            "clean": True,
            "memory_used_bytes": str(500 * MIB),
            "baseline_memory_bytes": str(500 * MIB),
        }
    ]

    # A process survives the container (and holds memory): not clean, quarantined.
    child.set(**{"0.mem_used": 9000 * MIB, "0.processes": f"4242:{8500 * MIB}"})
    dirty = child.ask(f"check {H100} {RTX}")
    attestation = dirty["attestation"]
    assert "clean" not in attestation  # false: a default, left out of the JSON
    h100, rtx = attestation["gpus"]
    assert "clean" not in h100
    assert h100["leftover_pids"] == [4242]
    assert h100["reason"] == "1 process(es) left on it (pid 4242)"
    assert rtx["clean"] is True
    assert dirty["quarantined"] == {H100: "1 process(es) left on it (pid 4242)"}

    # The process is gone but its memory is not: still quarantined, saying so.
    child.set(**{"0.mem_used": 2548 * MIB})
    still = child.ask("recheck")
    assert still["released"] == []
    assert still["quarantined"] == {H100: "2048 MiB of memory still used above its baseline"}

    # Memory within the slack of the baseline again: released.
    child.set(**{"0.mem_used": 530 * MIB})
    assert child.ask("recheck") == {"released": [H100], "quarantined": {}}


def test_a_gpu_busy_at_start_is_quarantined_without_a_baseline(child: Child) -> None:
    child.set(**{"1.processes": "77:1000", "1.mem_used": 700 * MIB})
    calibrated = child.ask(f"calibrate {H100} {RTX}")
    assert calibrated["quarantined"] == {RTX: "1 process(es) left on it (pid 77)"}
    assert set(calibrated["baseline"]) == {H100}
    child.set(**{"1.mem_used": 300 * MIB})
    assert child.ask("recheck") == {"released": [RTX], "quarantined": {}}


async def test_terminal_report_carries_the_attestation_of_its_gpus(
    runtime: DockerRuntime,
    store: ObjectStore,
    settings: DaemonSettings,
    test_image: str,
    cleanup_containers: list[str],
) -> None:
    uuids = ["GPU-a", "GPU-b"]
    dispatch = make_dispatch(test_image, command=["sh", "-c"], args=["exit 0"], gpu_uuids=uuids)
    dispatch.bucket = store.bucket
    cleanup_containers.append(dispatch.job_id)
    reports = Reports()
    executor = JobExecutor(
        dispatch,
        host_id="host-test",
        runtime=runtime,
        store=store,
        settings=settings,
        report=reports,
        scrubber=Scrubber(SimulatedReader()),
    )
    final = await executor.run()
    assert final.kind == messaging_pb2.JOB_REPORT_KIND_FINISHED
    assert [s.gpu_uuid for s in final.scrub.gpus] == uuids
    assert final.scrub.clean
    assert not final.scrub.measured
    assert final.scrub.HasField("checked_at")
    # Only the terminal report carries one.
    assert [r.HasField("scrub") for r in reports.items] == [False] * (len(reports.items) - 1) + [
        True
    ]
