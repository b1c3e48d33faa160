"""The pure scheduler on a simulated market: invariants under random hosts, jobs and events
(hypothesis), fair share between tenants, reservations against starvation, backfill,
priorities and the placement policies."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.scheduler.demand import Demand, Policy, parse_cc
from controlplane.scheduler.fairshare import FairShareConfig
from controlplane.scheduler.planner import PlannerConfig
from tests.controlplane.scheduler.sim import (
    A100,
    H100,
    L4,
    Market,
    Running,
    SimGpu,
    SimHost,
    demand,
    host_of,
)

MODELS = (H100, A100, L4)
CHEAPEST, BALANCED, PACK, SPREAD = (
    Policy.PLACEMENT_POLICY_CHEAPEST,
    Policy.PLACEMENT_POLICY_BALANCED,
    Policy.PLACEMENT_POLICY_PACK,
    Policy.PLACEMENT_POLICY_SPREAD,
)


def satisfies(d: Demand, host: SimHost, uuids: list[str]) -> str | None:
    """An independent check of every constraint; the first one broken, or None."""
    gpus = [g for g in host.gpus if g.uuid in uuids]
    if len(gpus) != len(uuids) or len(set(uuids)) != len(uuids):
        return "GPUs not all on the host"
    if len(uuids) != d.gpu_count:
        return "wrong GPU count"
    if host.simulated and not d.allow_simulated:
        return "simulated"
    if host.host_id in d.exclude:
        return "excluded"
    if d.locations and host.location not in d.locations:
        return "location"
    if any(host.labels.get(k) != v for k, v in d.host_labels):
        return "labels"
    if d.max_price and host.price > d.max_price:
        return "price"
    for gpu in gpus:
        if d.gpu_models and not any(m in gpu.name.lower() for m in d.gpu_models):
            return "model"
        if gpu.memory < d.min_vram_bytes:
            return "vram"
        if parse_cc(gpu.cc) < d.min_cc:
            return "compute capability"
        if not gpu.healthy:
            return "unhealthy"
    return None


@st.composite
def markets(draw: st.DrawFn) -> tuple[list[SimHost], list[tuple[Demand, float]]]:
    hosts = []
    for n in range(draw(st.integers(1, 8))):
        model = draw(st.sampled_from(MODELS))
        host = host_of(
            f"h{n}",
            draw(st.sampled_from([500_000, 1_000_000, 2_000_000, 3_000_000])),
            draw(st.integers(1, 8)),
            model,
            location=draw(st.sampled_from(["", "eu", "us"])),
            labels=draw(st.sampled_from([{}, {"tier": "a"}, {"tier": "b"}])),
            simulated=draw(st.booleans()),
            reliability=draw(st.integers(500, 1000)),
        )
        if draw(st.booleans()):  # a second model on the host
            extra = draw(st.sampled_from(MODELS))
            host.gpus.append(SimGpu(f"h{n}-x", extra[0], extra[1], extra[2]))
        for gpu in host.gpus:
            gpu.healthy = draw(st.integers(0, 9)) > 0
        hosts.append(host)
    jobs = []
    for n in range(draw(st.integers(1, 30))):
        d = demand(
            f"j{n:03d}",
            tenant=draw(st.sampled_from(["ta", "tb", "tc"])),
            gpus=draw(st.integers(0, 9)),
            models=draw(st.sampled_from([(), ("h100",), ("a100", "l4"), ("nope",)])),
            min_vram_gib=draw(st.sampled_from([0, 0, 30, 80])),
            min_cc=draw(st.sampled_from([(0, 0), (8, 0), (8, 9), (9, 0)])),
            max_price=draw(st.sampled_from([0, 0, 1_000_000, 2_500_000])),
            locations=draw(st.sampled_from([frozenset(), frozenset({"eu"})])),
            labels=draw(st.sampled_from([(), (("tier", "a"),)])),
            exclude=draw(st.sampled_from([frozenset(), frozenset({"h0"})])),
            allow_simulated=draw(st.booleans()),
            policy=draw(st.sampled_from([CHEAPEST, BALANCED, PACK, SPREAD])),
            max_duration=float(draw(st.integers(10, 600))),
            priority=draw(st.integers(0, 2)),
            queued_since=1_000_000.0 - draw(st.integers(0, 1000)),
        )
        jobs.append((d, float(draw(st.integers(1, 600)))))
    return hosts, jobs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(markets(), st.lists(st.integers(1, 400), min_size=1, max_size=8))
def test_no_gpu_twice_and_every_constraint_holds(
    market: tuple[list[SimHost], list[tuple[Demand, float]]], steps: list[int]
) -> None:
    hosts, jobs = market
    sim = Market(hosts, config=PlannerConfig(reserve_after_s=100))
    for d, runs in jobs:
        sim.submit(d, min(runs, d.max_duration_s))
    for step in steps:
        sim.cycle()  # asserts no GPU is given while taken, and GPUs are the host's
        for d, host_id, uuids in sim.placements:
            broken = satisfies(d, sim.hosts[host_id], uuids)
            assert broken is None, f"{d.job_id} on {host_id}: {broken}"
        live = [u for r in sim.running.values() for u in r.uuids]
        assert len(live) == len(set(live))
        sim.advance(step)
    placed = {d.job_id for d, _, _ in sim.placements}
    assert len(placed) == len(sim.placements)  # each job placed once


def test_two_equal_tenants_share_scarce_gpus_within_10_percent() -> None:
    hosts = [host_of("h1", 1_000_000, 4, H100), host_of("h2", 1_000_000, 4, H100)]
    sim = Market(hosts, fair=FairShareConfig(half_life_s=1800, horizon_s=300))
    # Tenant a floods the queue first with big jobs; tenant b sends many small ones.
    for n in range(400):
        sim.submit(demand(f"a{n:03d}", "a", gpus=2, max_duration=120), 120)
    for n in range(800):
        sim.submit(demand(f"b{n:03d}", "b", gpus=1, max_duration=90), 90)
    for _ in range(4 * 60 * 6):  # 4 hours in 10 s cycles
        sim.cycle()
        sim.advance(10)
    total = sim.gpu_seconds["a"] + sim.gpu_seconds["b"]
    assert total == pytest.approx(8 * 4 * 3600, rel=0.02)  # the GPUs were never idle
    for tenant in ("a", "b"):
        share = sim.gpu_seconds[tenant] / total
        print(f"\n[fair share] tenant {tenant}: {share:.3f} of {total / 3600:.1f} GPU-hours")
        assert abs(share - 0.5) <= 0.05, share  # within 10% of half


def test_weights_split_gpu_time_in_proportion() -> None:
    hosts = [host_of("h1", 1_000_000, 6, H100)]
    sim = Market(hosts, fair=FairShareConfig(half_life_s=1800, horizon_s=300, weights={"a": 2}))
    for n in range(1200):  # more than either tenant can run in the 3 hours
        sim.submit(demand(f"a{n:04d}", "a", max_duration=60), 60)
        sim.submit(demand(f"b{n:04d}", "b", max_duration=60), 60)
    for _ in range(6 * 180):
        sim.cycle()
        sim.advance(10)
    share = sim.gpu_seconds["a"] / (sim.gpu_seconds["a"] + sim.gpu_seconds["b"])
    assert share == pytest.approx(2 / 3, abs=0.05)


def test_a_large_job_is_not_starved_by_a_stream_of_small_ones() -> None:
    sim = Market([host_of("h1", 1_000_000, 8, H100)], config=PlannerConfig(reserve_after_s=300))
    # Tenant big has used a lot lately, so fair share alone would always serve small first.
    sim.fair.seed("big", 10**7)
    submitted = sim.now
    sim.submit(demand("large", "big", gpus=8, max_duration=600, queued_since=submitted), 600)
    n = 0
    for _ in range(200):  # ~33 minutes: small jobs keep arriving faster than they end
        for _ in range(3):
            sim.submit(demand(f"s{n:04d}", "small", max_duration=120, queued_since=sim.now), 120)
            n += 1
        sim.cycle()
        if "large" in sim.started_at:
            break
        sim.advance(10)
    assert "large" in sim.started_at, sim.last_plan.reasons.get("large")
    waited = sim.started_at["large"] - submitted
    # Bounded: the reservation after 300 s, then at most one small job's max duration.
    assert waited <= 300 + 120 + 10, waited
    print(f"\n[reservation] the 8-GPU job started after {waited:.0f} s of small-job traffic")


def test_backfill_uses_a_reserved_host_only_for_jobs_that_end_in_time() -> None:
    sim = Market([host_of("h1", 1_000_000, 4, H100)], config=PlannerConfig(reserve_after_s=0))
    sim.submit(demand("busy", "x", gpus=2, max_duration=1000), 1000)
    sim.cycle()
    sim.submit(demand("large", "y", gpus=4, max_duration=60, queued_since=sim.now - 1))
    sim.submit(demand("long", "z", gpus=1, max_duration=2000, queued_since=sim.now))
    sim.submit(demand("short", "z", gpus=1, max_duration=500, queued_since=sim.now))
    plan = sim.cycle()
    assert [(r.job_id, r.host_id, r.start) for r in plan.reservations] == [
        ("large", "h1", sim.now + 1000)
    ]
    assert [p.demand.job_id for p in plan.placed] == ["short"]
    assert "reserved for this job" in plan.reasons["large"]
    assert plan.reasons["long"] == (
        "0 of 1 online hosts have 1×GPU free; 1 is reserved for a job that has waited longer"
    )


def test_higher_priority_first_even_for_a_heavier_tenant() -> None:
    sim = Market([host_of("h1", 1_000_000, 1, H100)])
    sim.fair.seed("heavy", 10**9)
    sim.submit(demand("light-normal", "light", priority=0))
    sim.submit(demand("heavy-urgent", "heavy", priority=5))
    plan = sim.cycle()
    assert [p.demand.job_id for p in plan.placed] == ["heavy-urgent"]


def _policy_market() -> Market:
    partly = host_of("partly", 1_000_000, 8, H100)
    for gpu in partly.gpus[:6]:
        gpu.job = "other"
    empty = host_of("empty", 1_100_000, 8, H100)
    flaky = host_of("flaky", 900_000, 8, H100, reliability=600)
    sim = Market([partly, empty, flaky])
    for gpu in partly.gpus[:6]:
        sim.running.setdefault("other", _fake_running(partly, gpu))
    return sim


def _fake_running(host: SimHost, gpu: SimGpu) -> Running:
    uuids = [g.uuid for g in host.gpus if g.job == "other"]
    return Running(demand("other", "o", gpus=len(uuids)), host.host_id, uuids, 0.0, 10**9)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [(CHEAPEST, "flaky"), (BALANCED, "empty"), (PACK, "partly"), (SPREAD, "flaky")],
)
def test_policies_choose_as_documented(policy: int, expected: str) -> None:
    sim = _policy_market()
    sim.submit(demand("j", gpus=2, policy=policy))
    plan = sim.cycle()
    assert [p.host_id for p in plan.placed] == [expected]


def test_why_pending_is_exact_for_hand_built_hosts() -> None:
    busy = host_of("busy", 1_000_000, 8, H100)
    for gpu in busy.gpus[:4]:
        gpu.job = "other"
    hosts = [
        busy,
        host_of("dear", 9_000_000, 8, H100),
        host_of("dear2", 9_000_000, 8, H100),
        host_of("small", 1_000_000, 4, H100),
        host_of("other-model", 1_000_000, 8, L4),
        host_of("sim", 1_000_000, 8, H100, simulated=True),
        host_of("far", 1_000_000, 8, H100, location="us"),
    ]
    sim = Market(hosts)
    sim.running["other"] = _fake_running(busy, busy.gpus[0])
    sim.submit(
        demand("j", gpus=8, models=("h100",), max_price=2_000_000, locations=frozenset({"", "eu"}))
    )
    plan = sim.cycle()
    assert plan.placed == []
    assert plan.reasons["j"] == (
        "0 of 7 online hosts have 8×H100 free; "
        "2 would fit but exceed max_price_per_gpu_hour; "
        "1 has simulated GPUs (set allow_simulated); "
        "1 is in another location; "
        "1 has no GPU of an allowed model/VRAM/compute capability; "
        "1 has too few matching GPUs; "
        "1 lacks enough free matching GPUs right now"
    )


def test_a_cycle_over_many_look_alike_jobs_explains_them_all() -> None:
    sim = Market([host_of("h1", 1_000_000, 2, A100)])
    for n in range(5000):
        sim.submit(demand(f"j{n:04d}", f"t{n % 7}", gpus=1, min_vram_gib=80))
    plan = sim.cycle()
    assert plan.placed == []
    assert plan.decisions == 5000
    assert set(plan.reasons.values()) == {
        "0 of 1 online hosts have 1×GPU free; "
        "1 has no GPU of an allowed model/VRAM/compute capability"
    }
    assert len(plan.reasons) == 5000
