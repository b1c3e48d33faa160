"""The 3-node NATS cluster launcher: an R3 stream survives its leader's kill -9, and the
killed node comes back on its ports and store and catches up."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.js.api import StreamConfig

from devstack import NatsCluster

pytestmark = pytest.mark.timeout(90)


async def test_a_replicated_stream_outlives_its_leader_node(tmp_path: Path) -> None:
    with NatsCluster(tmp_path / "cluster") as cluster:
        names = [node.name for node in cluster.nodes]
        assert len(set(names)) == 3
        assert cluster.meta_leader() in names
        assert len({(n.port, n.cluster_port, n.monitor_port) for n in cluster.nodes}) == 3
        nc = await nats.connect(servers=cluster.urls.split(","), reconnect_time_wait=0.2)
        try:
            js = nc.jetstream()
            deadline = time.monotonic() + 30
            while True:  # a fresh cluster's first stream can time out while its peers settle
                try:
                    await js.add_stream(StreamConfig(name="R3", subjects=["r3.>"], num_replicas=3))
                    break
                except (nats.errors.Error, TimeoutError):
                    assert time.monotonic() < deadline, "the R3 stream was never created"
                    await asyncio.sleep(0.2)
            while True:  # ... and its first publish, until the stream's own leader is elected
                try:
                    await js.publish("r3.a", b"before", timeout=1, headers={"Nats-Msg-Id": "b"})
                    break
                except (nats.errors.Error, TimeoutError):
                    assert time.monotonic() < deadline, "the R3 stream never took a message"
                    await asyncio.sleep(0.2)
            info = await js.stream_info("R3")
            assert info.cluster is not None
            leader = info.cluster.leader
            assert leader in names
            victim = names.index(leader)
            port = cluster.nodes[victim].port

            cluster.kill(victim)
            assert not cluster.nodes[victim].running
            deadline = time.monotonic() + 30
            while True:  # a new leader is elected among the two left
                try:
                    await js.publish("r3.a", b"during", timeout=1)
                    break
                except (nats.errors.Error, TimeoutError):
                    assert time.monotonic() < deadline, "no new stream leader"
                    await asyncio.sleep(0.1)
            after = await js.stream_info("R3")
            assert after.cluster is not None
            assert after.cluster.leader != leader

            back_in = await asyncio.to_thread(cluster.restart, victim)
            assert back_in < 30
            assert cluster.nodes[victim].port == port
            assert cluster.nodes[victim].healthy()
            # The restarted node rejoins the stream's replicas and catches up to both messages
            # (healthy can answer a moment before the last append is applied).
            deadline = time.monotonic() + 10
            while (state := cluster.nodes[victim].monitor("/jsz") or {}).get("messages") != 2:
                assert time.monotonic() < deadline, state
                await asyncio.sleep(0.05)
        finally:
            await nc.close()
    assert not any(node.running for node in cluster.nodes)
