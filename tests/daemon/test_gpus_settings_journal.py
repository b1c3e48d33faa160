"""Simulated GPU specs, settings (machine id, env), the journal's atomic files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from gpuplane.v1 import types_pb2

from daemon.gpus import GIB, NoGpuError, UnknownGpuModel, discover, simulated_gpus
from daemon.journal import Journal, JournalEntry
from daemon.progress import Progress
from daemon.settings import DaemonSettings, derive_machine_id


def test_simulated_gpus_from_spec() -> None:
    inventory = simulated_gpus("4xA100-80GB", "machine-a")
    assert inventory.simulated
    assert [g.index for g in inventory.gpus] == [0, 1, 2, 3]
    first = inventory.gpus[0]
    assert first.name == "NVIDIA A100-SXM4-80GB"
    assert first.memory_total_bytes == 80 * GIB
    assert first.compute_capability == "8.0"
    assert first.uuid.startswith("GPU-")
    assert first.pci_bus_id == "00000000:18:00.0"
    assert first.mig_mode == types_pb2.MIG_MODE_DISABLED
    assert len({g.uuid for g in inventory.gpus}) == 4
    assert len({g.pci_bus_id for g in inventory.gpus}) == 4


def test_simulated_uuids_are_stable_per_machine() -> None:
    again = simulated_gpus("4xa100-80gb", "machine-a")
    assert [g.uuid for g in again.gpus] == [
        g.uuid for g in simulated_gpus("4xA100-80GB", "machine-a").gpus
    ]
    other = simulated_gpus("4xA100-80GB", "machine-b")
    assert not {g.uuid for g in other.gpus} & {g.uuid for g in again.gpus}


def test_mixed_and_single_specs() -> None:
    inventory = simulated_gpus("2xH100, L4", "m")
    assert [g.name for g in inventory.gpus] == [
        "NVIDIA H100 80GB HBM3",
        "NVIDIA H100 80GB HBM3",
        "NVIDIA L4",
    ]
    assert inventory.gpus[2].compute_capability == "8.9"
    assert inventory.missing([inventory.gpus[0].uuid, "GPU-nope"]) == ["GPU-nope"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("4xV100", "unknown GPU model 'V100'; known models: A100-80GB, A100-40GB, H100"),
        ("four", "unknown GPU model 'four'"),
        ("0xH100", "count 0 is not between 1 and 64"),
        ("4*H100", "expected COUNTxMODEL"),
    ],
)
def test_bad_specs_are_explained(spec: str, message: str) -> None:
    with pytest.raises(UnknownGpuModel, match=message):
        simulated_gpus(spec, "m")


def test_machine_id_depends_on_machine_and_data_dir(tmp_path: Path) -> None:
    id_file = tmp_path / "machine-id"
    id_file.write_text("abc\n")
    one = derive_machine_id(tmp_path / "a", (id_file,))
    assert one == derive_machine_id(tmp_path / "a", (id_file,))
    assert one != derive_machine_id(tmp_path / "b", (id_file,))
    id_file.write_text("other\n")
    assert one != derive_machine_id(tmp_path / "a", (id_file,))
    assert len(one) == 32


def test_settings_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUPLANE_DAEMON_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("GPUPLANE_DAEMON_REGISTRATION_TOKEN", "grt_zq81secret")
    monkeypatch.setenv("GPUPLANE_DAEMON_LABELS", '{"rack": "r1"}')
    monkeypatch.setenv("GPUPLANE_DAEMON_GPU_DEVICE_REQUESTS", "never")
    settings = DaemonSettings()
    assert settings.data_dir == tmp_path
    assert settings.registration_token is not None
    assert settings.registration_token.get_secret_value() == "grt_zq81secret"
    assert "zq81secret" not in repr(settings)
    assert settings.labels == {"rack": "r1"}
    assert settings.gpu_device_requests == "never"
    assert settings.machine_id == derive_machine_id(tmp_path)
    assert settings.price_per_gpu_hour_micro_credits == 2_000_000


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="this machine has an NVIDIA GPU")
def test_discover_without_gpus_tells_about_simulation(tmp_path: Path) -> None:
    with pytest.raises(NoGpuError, match="--simulate-gpus 2xA100-80GB"):
        discover(DaemonSettings(data_dir=tmp_path))


@pytest.mark.parametrize(
    ("written", "read"),
    [
        ("ACCEPTED", Progress.ACCEPTED),
        ("JOB_REPORT_KIND_STARTING", Progress.STARTING),
        ("JOB_REPORT_KIND_RUNNING", Progress.RUNNING),
        ("JOB_REPORT_KIND_USAGE", Progress.RUNNING),
        ("JOB_REPORT_KIND_UPLOADING", Progress.UPLOADING),
    ],
)
def test_journal_reads_the_steps_earlier_runs_wrote(
    tmp_path: Path, written: str, read: Progress
) -> None:
    journal = Journal(tmp_path / "journal")
    record = {"job_id": "job-1", "attempt": 1, "last_seq": 4, "state": written}
    (tmp_path / "journal" / "job-1.1.json").write_text(json.dumps(record))
    assert journal.entries() == [JournalEntry("job-1", 1, last_seq=4, state=read)]
    journal.update("job-1", 1, last_seq=5)
    assert json.loads((tmp_path / "journal" / "job-1.1.json").read_text())["state"] == read.value


def test_a_journal_entry_of_no_known_step_is_skipped(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    record = {"job_id": "job-1", "attempt": 1, "state": "JOB_REPORT_KIND_FINISHED"}
    (tmp_path / "journal" / "job-1.1.json").write_text(json.dumps(record))
    assert journal.entries() == []


def test_journal_roundtrip_and_atomic_files(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    journal.write(JournalEntry("job/1", 2))
    entry = journal.update("job/1", 2, container_id="c1", last_seq=3, state=Progress.RUNNING)
    assert entry == JournalEntry("job/1", 2, "c1", 3, Progress.RUNNING)
    assert journal.get("job/1", 2) == entry
    files = list((tmp_path / "journal").iterdir())
    assert [f.name for f in files] == ["job_1.2.json"]
    assert os.stat(files[0]).st_mode & 0o777 == 0o600
    assert json.loads(files[0].read_text())["container_id"] == "c1"
    (tmp_path / "journal" / "broken.1.json").write_text("{not json")
    assert journal.entries() == [entry]
    journal.remove("job/1", 2)
    journal.remove("job/1", 2)
    assert journal.get("job/1", 2) is None
