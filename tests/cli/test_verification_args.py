"""`jobs submit --allow-unverified` and what `hosts` shows of verification."""

from __future__ import annotations

from gpuplane.v1 import types_pb2

from gpuplane_cli.hosts import offers_table, show_host
from tests.cli.test_args import spec_of


def test_allow_unverified_is_off_unless_asked() -> None:
    assert spec_of("--image", "busybox").allow_unverified is False
    assert spec_of("--image", "busybox", "--allow-unverified").allow_unverified is True


def test_hosts_and_offers_show_verification_and_why_not() -> None:
    host = types_pb2.Host(host_id="h", verification_reason="probe 3: GPU 0: row 5 is wrong")
    assert "no (probe 3: GPU 0: row 5 is wrong)" in show_host(host)
    verified = types_pb2.Host(host_id="h", verified=True)
    verified.verified_at.GetCurrentTime()
    assert "Verified" in show_host(verified)
    assert "yes" in show_host(verified)
    table = offers_table(
        [types_pb2.Offer(host_id="a", verified=True), types_pb2.Offer(host_id="b")]
    )
    rows = table.splitlines()
    assert "VERIFIED" in rows[0]
    assert rows[1].rstrip().endswith("yes")
    assert rows[2].rstrip().endswith("no")
