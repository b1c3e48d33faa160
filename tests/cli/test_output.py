"""Tables, key/value blocks, enum names and JSON output of the CLI."""

from __future__ import annotations

import io
import json

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import types_pb2

from gpuplane_cli.output import (
    enum_name,
    enum_value,
    fields,
    gpu_summary,
    print_json,
    short_names,
    table,
    when,
)


def test_table_aligns_columns_and_trims_the_last() -> None:
    text = table(
        ["JOB", "STATE", "NOTE"],
        [("job_1", "RUNNING", "short"), ("job_123456", "QUEUED", None), ("j", 7, "")],
    )
    assert text.splitlines() == [
        "JOB         STATE    NOTE",
        "job_1       RUNNING  short",
        "job_123456  QUEUED",
        "j           7",
    ]


def test_table_with_no_rows_prints_the_header() -> None:
    assert table(["A", "BB"], []) == "A  BB"


def test_fields_aligns_values_and_drops_none() -> None:
    assert fields([("Job", "j1"), ("Exit code", None), ("State", "RUNNING")]).splitlines() == [
        "Job:    j1",
        "State:  RUNNING",
    ]


def test_enum_names_short_and_long() -> None:
    assert enum_name(types_pb2.JobState, types_pb2.JOB_STATE_TIMED_OUT) == "TIMED_OUT"
    assert enum_value(types_pb2.JobState, "timed-out") == types_pb2.JOB_STATE_TIMED_OUT
    assert enum_value(types_pb2.JobState, "JOB_STATE_QUEUED") == types_pb2.JOB_STATE_QUEUED
    assert "unspecified" not in short_names(types_pb2.JobState)
    with pytest.raises(ValueError, match="queued"):
        enum_value(types_pb2.JobState, "sleeping")
    with pytest.raises(ValueError, match="not one of"):
        enum_value(types_pb2.JobState, "unspecified")


def test_when_is_utc_and_empty_when_unset() -> None:
    assert when(Timestamp()) == ""
    assert when(Timestamp(seconds=1_800_000_000)) == "2027-01-15 08:00:00Z"


def test_gpu_summary_groups_models() -> None:
    gpus = [types_pb2.Gpu(name="A100"), types_pb2.Gpu(name="A100"), types_pb2.Gpu(name="L4")]
    assert gpu_summary(gpus) == "2× A100, 1× L4"
    assert gpu_summary([]) == "-"


def test_json_uses_proto_field_names_and_keeps_zero_values() -> None:
    out = io.StringIO()
    balance = types_pb2.Balance(tenant_id="t1", available_micro_credits=2_500_000)
    print_json(balance, out)
    data = json.loads(out.getvalue())
    assert data == {
        "tenant_id": "t1",
        "available_micro_credits": "2500000",  # int64 as a string: exact in every JSON parser
        "held_micro_credits": "0",
        "earnings_micro_credits": "0",
        "accounts": [],
    }
    out = io.StringIO()
    print_json([types_pb2.Tenant(tenant_id="a"), types_pb2.Tenant(tenant_id="b")], out)
    assert [t["tenant_id"] for t in json.loads(out.getvalue())] == ["a", "b"]
