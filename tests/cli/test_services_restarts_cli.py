"""`services get` shows each replica's restarts in place beside the service's replacements,
and `services list` names the latter as such."""

from __future__ import annotations

from gpuplane.v1 import services_pb2, types_pb2

from gpuplane_cli.services import services_table, show_service


def test_each_replica_shows_its_restarts_in_place() -> None:
    service = services_pb2.Service(
        service_id="svc_1",
        name="web",
        restarts=1,
        replicas=[
            services_pb2.ServiceReplica(
                replica_id="rep_a", state=types_pb2.JOB_STATE_RUNNING, ready=True, restarts=2
            ),
            services_pb2.ServiceReplica(replica_id="rep_b", state=types_pb2.JOB_STATE_FAILED),
        ],
    )
    shown = show_service(service).splitlines()
    assert any(line.split()[:2] == ["Replacements:", "1"] for line in shown), shown
    header = next(line for line in shown if line.startswith("REPLICA"))
    assert header.split()[:4] == ["REPLICA", "STATE", "READY", "RESTARTS"]
    rows = {line.split()[0]: line.split() for line in shown if line.startswith("rep_")}
    assert rows["rep_a"][2:4] == ["yes", "2"]
    assert rows["rep_b"][2:4] == ["no", "0"]
    assert "REPLACED" in services_table([service]).splitlines()[0]
