"""NvmlSampler through the real pynvml against the fake libnvidia-ml.so.1, driven through its
state file: values, changes, XIDs once, a GPU that vanishes and returns, unsupported queries,
and GPU processes attributed to jobs through /proc/<pid>/cgroup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).parent.parent.parent
H100 = "GPU-fa4e0000-0000-0000-0000-000000000000"
RTX = "GPU-fa4e0000-0000-0000-0000-000000000001"
CONTAINER = "4f" * 32
# The sampler in a child process (the loader reads LD_LIBRARY_PATH at start), answering one
# JSON line per command: "sample", "bench ROUNDS", "pending" (XIDs not sampled yet), "quit".
_DRIVER = """
import json, sys, time
from pathlib import Path
from google.protobuf.json_format import MessageToDict
from daemon.attribution import JobAttribution
from daemon.gpus import nvml_gpus
from daemon.nvml import NvmlSampler

config = json.loads(sys.argv[1])
inventory = nvml_gpus()
attribution = JobAttribution(lambda: config["containers"], proc=Path(config["proc"]))
sampler = NvmlSampler([g.uuid for g in inventory.gpus], attribution.job_of, xid_wait_ms=50)
sampler.open()
print(json.dumps("ready"), flush=True)
for line in sys.stdin:
    command = line.split()
    if command[0] == "sample":
        samples = [MessageToDict(s, preserving_proto_field_name=True) for s in sampler.sample()]
        print(json.dumps(samples), flush=True)
    elif command[0] == "bench":
        rounds = int(command[1])
        started = time.perf_counter()
        for _ in range(rounds):
            sampler.sample()
        print(json.dumps((time.perf_counter() - started) / rounds), flush=True)
    elif command[0] == "pending":
        print(json.dumps(sum(len(q) for q in sampler._xids.values())), flush=True)
    else:
        break
sampler.close()
"""


class Child:
    def __init__(self, library: Path, state: Path, proc: Path, gpus: int = 2) -> None:
        self.state = state
        env = {
            **os.environ,
            "LD_LIBRARY_PATH": str(library),
            "FAKE_NVML_STATE": str(state),
            "FAKE_NVML_GPUS": str(gpus),
        }
        config = json.dumps({"containers": {CONTAINER: "job-a"}, "proc": str(proc)})
        self.process = subprocess.Popen(
            [sys.executable, "-c", _DRIVER, config],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=ROOT,
            text=True,
        )
        assert self.read() == "ready"

    def read(self) -> Any:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"the sampler child died (exit {self.process.poll()})"
        return json.loads(line)

    def ask(self, command: str) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def sample(self) -> dict[str, dict[str, Any]]:
        return {s["gpu_uuid"]: s for s in self.ask("sample")}

    def set(self, **values: object) -> None:
        """Rewrites the state file (renamed into place, so the fake sees a new file)."""
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
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "cgroup").write_text(f"0::/system.slice/docker-{CONTAINER}.scope\n")
    running = Child(fake_nvml, tmp_path / "nvml.state", proc)
    try:
        yield running
    finally:
        running.close()


def test_values_are_read_and_changes_show_in_the_next_sample(child: Child) -> None:
    child.set(
        **{
            "0.util_gpu": 97,
            "0.util_mem": 41,
            "0.mem_used": 60 << 30,
            "0.temp": 71,
            "0.power_mw": 612_345,
            "0.sm_clock": 1980,
            "0.ecc_corrected": 3,
            "0.ecc_uncorrected": 1,
            "0.clocks_event_reasons": 0x40 | 0x4,
            "0.processes": "4242:1073741824,777:5",
        }
    )
    h100 = child.sample()[H100]
    assert h100["utilization_gpu_percent"] == 97
    assert h100["utilization_memory_percent"] == 41
    assert h100["memory_used_bytes"] == str(60 << 30)
    assert h100["temperature_celsius"] == 71
    assert h100["power_draw_milliwatts"] == 612_345
    assert h100["sm_clock_mhz"] == 1980
    assert h100["ecc_corrected_errors"] == "3"
    assert h100["ecc_uncorrected_errors"] == "1"
    assert h100["throttle_reasons"] == str(0x44)
    assert h100["processes"] == [
        {"pid": 4242, "used_memory_bytes": str(1 << 30), "job_id": "job-a"},
        {"pid": 777, "used_memory_bytes": "5"},  # no such PID: not a job's
    ]
    assert "time" in h100
    assert "xid_events" not in h100

    child.set(**{"0.util_gpu": 12, "0.temp": 80})
    h100 = child.sample()[H100]
    assert (h100["utilization_gpu_percent"], h100["temperature_celsius"]) == (12, 80)
    assert "processes" not in h100


def wait_for_xids(child: Child, uuid: str, rounds: int = 200) -> list[dict[str, Any]]:
    """XIDs arrive on the event thread: sample until one shows (50 ms wait in the child)."""
    for _ in range(rounds):
        events: list[dict[str, Any]] = child.sample()[uuid].get("xid_events", [])
        if events:
            return events
    raise AssertionError("no XID arrived")


def test_an_injected_xid_is_reported_once(child: Child) -> None:
    child.set(**{"1.xids": 79})
    events = wait_for_xids(child, RTX)
    assert [e["xid"] for e in events] == [79]
    assert events[0]["time"]
    assert "xid_events" not in child.sample()[RTX]
    child.set(**{"1.xids": "79,48"})
    assert [e["xid"] for e in wait_for_xids(child, RTX)] == [48]
    assert "xid_events" not in child.sample()[H100]


def test_a_gpu_missing_from_the_file_vanishes_from_the_batch_and_returns(child: Child) -> None:
    assert set(child.sample()) == {H100, RTX}
    child.set(devices="0")
    assert set(child.sample()) == {H100}
    child.set(devices="0,1", **{"1.util_gpu": 55})
    back = child.sample()
    assert set(back) == {H100, RTX}
    assert back[RTX]["utilization_gpu_percent"] == 55


def test_unsupported_queries_leave_their_fields_zero(child: Child) -> None:
    child.set(
        **{
            "1.unsupported": "util,temp,power_mw,sm_clock,ecc,clocks_event_reasons,processes",
            "1.util_gpu": 50,
            "1.temp": 60,
            "1.processes": "4242:1",
            "0.temp": 44,
        }
    )
    samples = child.sample()
    # Every other field is 0 (the proto default); memory used is the fake's default 1 MiB.
    assert set(samples[RTX]) == {"gpu_uuid", "time", "memory_used_bytes"}
    assert samples[H100]["temperature_celsius"] == 44


def test_sampling_cost_per_gpu(fake_nvml: Path, tmp_path: Path) -> None:
    """Eight GPUs with a busy state file; prints the cost (pytest -s) and bounds it loosely."""
    values = {f"{i}.util_gpu": 90 for i in range(8)} | {"0.processes": "1:1,2:2"}
    running = Child(fake_nvml, tmp_path / "nvml.state", tmp_path / "proc", gpus=8)
    try:
        running.set(**values)
        per_round = running.ask("bench 500")
    finally:
        running.close()
    per_gpu_us = per_round / 8 * 1e6
    print(f"\nNVML sampling (fake library): {per_gpu_us:.1f} us per GPU per round")
    assert per_gpu_us < 2000


def test_an_xid_storm_is_spread_over_samples_each_once(child: Child) -> None:
    storm = list(range(100, 120))
    child.set(**{"0.xids": ",".join(map(str, storm))})
    for _ in range(500):  # the event thread takes them one wait at a time
        if child.ask("pending") == len(storm):
            break
    first, second, third = (child.sample()[H100].get("xid_events", []) for _ in range(3))
    # At most 16 in one sample (what the control plane takes), the rest in the next.
    assert [e["xid"] for e in first] == storm[:16]
    assert [e["xid"] for e in second] == storm[16:]
    assert third == []
