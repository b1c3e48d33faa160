"""Every registered state machine: each edge has a code path that takes it, and no code writes
a state around the entity's setter; plus the setters' own behaviour (history, live/lost)."""

from __future__ import annotations

import ast
import asyncio
import importlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import controlplane
from controlplane import statemachine
from controlplane.auth.models import Tenant
from controlplane.db import migrate
from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.jobs.models import Job, JobAttempt, JobEvent
from controlplane.jobs.states import (
    AttemptState,
    JobState,
    Placement,
    new_job,
    schedule_jobs,
    set_attempt_state,
    set_job_state,
)
from controlplane.registry.models import Host, HostEvent
from controlplane.registry.repository import RegistryRepository
from controlplane.registry.states import HostState, new_host, set_host_state
from controlplane.statemachine import MACHINES, InvalidTransition, StateMachine

ROOT = Path(controlplane.__file__).parent
# Columns only a setter writes: the state, and the attempt's flags derived from it.
GUARDED = frozenset({"state", "live", "lost"})
# Alembic migrations write schema, not entities.
SKIPPED = ("db/migrations/",)


def _module_name(path: Path) -> str:
    return ".".join(("controlplane", *path.relative_to(ROOT).with_suffix("").parts))


def _sources() -> Iterator[tuple[Path, ModuleType, ast.Module]]:
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if any(relative.startswith(skip) for skip in SKIPPED):
            continue
        module = importlib.import_module(_module_name(path))
        yield path, module, ast.parse(path.read_text(), str(path))


# Importing every module registers every machine (each states.py registers its own).
SOURCES = list(_sources())
ENUMS: dict[type[StrEnum], StateMachine[StrEnum]] = {m.states: m for m in MACHINES.values()}
SETTERS = {f"set_{m.entity}_state": m for m in MACHINES.values()}


def _is_states_module(path: Path) -> bool:
    return path.name == "states.py"


def _member(node: ast.AST, module: ModuleType) -> StrEnum | None:
    """The registered state a node names (`JobState.QUEUED`, or through an alias such as
    `S.QUEUED`), resolved against the module's own globals."""
    if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
        return None
    owner = vars(module).get(node.value.id)
    if isinstance(owner, type) and owner in ENUMS and node.attr in owner.__members__:
        member: StrEnum = owner[node.attr]
        return member
    return None


def _members(nodes: list[ast.expr], module: ModuleType) -> Iterator[StrEnum]:
    for node in nodes:
        for inner in ast.walk(node):
            found = _member(inner, module)
            if found is not None:
                yield found


def _callee(call: ast.Call) -> tuple[str, ast.expr | None]:
    """The called name and, for a method, the object it is called on."""
    if isinstance(call.func, ast.Name):
        return call.func.id, None
    if isinstance(call.func, ast.Attribute):
        return call.func.attr, call.func.value
    return "", None


def _produced_by(call: ast.Call, module: ModuleType) -> Iterator[StrEnum]:
    """States a call sets or declares: a literal target of a setter, of a machine's
    check/require, or anything inside `produces(...)`."""
    name, owner = _callee(call)
    arguments = [*call.args, *(k.value for k in call.keywords)]
    if name in SETTERS:
        yield from _members(arguments, module)
    elif name == "produces" and vars(module).get(name) is statemachine.produces:
        yield from _members(arguments, module)
    elif name in ("check", "require") and isinstance(owner, ast.Name):
        if isinstance(vars(module).get(owner.id), StateMachine) and len(call.args) == 2:
            yield from _members([call.args[1]], module)


def produced() -> dict[type[StrEnum], set[StrEnum]]:
    states: dict[type[StrEnum], set[StrEnum]] = defaultdict(set)
    for _, module, tree in SOURCES:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                for member in _produced_by(node, module):
                    states[type(member)].add(member)
    return states


def test_every_state_module_is_registered() -> None:
    registered = {m.states.__module__ for m in MACHINES.values()}
    modules = {module.__name__ for path, module, _ in SOURCES if _is_states_module(path)}
    assert modules <= registered
    assert {"job", "attempt", "host"} <= set(MACHINES)


@pytest.mark.parametrize("entity", sorted(MACHINES))
def test_each_machine_has_its_setter_beside_it(entity: str) -> None:
    machine = MACHINES[entity]
    module = importlib.import_module(machine.states.__module__)
    assert callable(getattr(module, f"set_{entity}_state", None)), (
        f"{module.__name__} has no set_{entity}_state: every machine has its only setter "
        "beside its table"
    )
    assert machine.initial not in machine.terminal


@pytest.mark.parametrize("entity", sorted(MACHINES))
def test_every_edge_is_taken_by_some_code_path(entity: str) -> None:
    machine = MACHINES[entity]
    made = produced()[machine.states]
    untaken = [
        f"{edge.source.value} → {edge.target.value} ({edge.why})"
        for edge in machine.edges()
        if edge.target not in made
    ]
    assert not untaken, (
        f"{entity}: no setter call in controlplane/ produces the target of these edges (a "
        f"literal {machine.states.__name__}.X target, or one declared with produces(...)); "
        "drop the edge until its producer exists:\n  " + "\n  ".join(untaken)
    )


@dataclass(frozen=True)
class Bypass:
    path: Path
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT.parent)}:{self.line}: {self.what}"


def _names_a_state(node: ast.AST, module: ModuleType) -> bool:
    for inner in ast.walk(node):
        if _member(inner, module) is not None:
            return True
        if isinstance(inner, ast.Name) and vars(module).get(inner.id) in ENUMS:
            return True
    return False


def _is_protobuf(call: ast.Call) -> bool:
    owner = call.func.value if isinstance(call.func, ast.Attribute) else None
    return isinstance(owner, ast.Name) and owner.id.endswith("_pb2")


def _writes(tree: ast.Module) -> Iterator[tuple[ast.AST, str, ast.AST]]:
    """(node, description, value written) of every write of a guarded column."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for inner in ast.walk(target):
                    if isinstance(inner, ast.Attribute) and inner.attr in GUARDED:
                        yield node, f"assigns .{inner.attr}", node.value or node
        elif isinstance(node, ast.Call) and not _is_protobuf(node):
            for keyword in node.keywords:
                if keyword.arg in GUARDED:
                    yield node, f"passes {keyword.arg}= to {ast.unparse(node.func)}", keyword.value
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value in GUARDED:
                    yield node, f'builds a row with "{key.value}"', value


def bypasses() -> list[Bypass]:
    """Writes of a state outside the states modules: in a package whose entities have a
    machine, or of a value that names a registered state."""
    governed = {m.states.__module__.rpartition(".")[0] for m in MACHINES.values()}
    found = []
    for path, module, tree in SOURCES:
        if _is_states_module(path):
            continue
        package = module.__name__.rpartition(".")[0]
        for node, what, value in _writes(tree):
            if package in governed or _names_a_state(value, module):
                found.append(Bypass(path, getattr(node, "lineno", 0), what))
    return found


def test_no_state_is_written_around_its_setter() -> None:
    found = bypasses()
    assert not found, (
        "state written outside its states module; call the entity's setter (or its batch "
        "form) instead:\n  " + "\n  ".join(map(str, found))
    )


# The setters themselves ------------------------------------------------------------------


class Rows(list[Any]):
    def add(self, row: Any) -> None:
        self.append(row)


def _queued_job(rows: Rows) -> Job:
    return new_job(
        rows,
        job_id="job_1",
        tenant_id="t",
        spec=b"",
        gpu_count=1,
        priority=0,
        max_retries=0,
        labels={},
        hold_amount=10,
        idempotency_key=None,
        request_hash="h",
        now=utcnow(),
    )


def test_new_job_records_its_first_event_through_the_setter_path() -> None:
    rows = Rows()
    job = _queued_job(rows)
    events = [r for r in rows if isinstance(r, JobEvent)]
    assert (job.state, job.event_seq, job.attempt) == ("queued", 1, 1)
    assert job.state_reason == "waiting for the scheduler"
    assert [(e.seq, e.attempt, e.state, e.reason) for e in events] == [(1, 1, "queued", "")]


def test_set_job_state_refuses_what_the_table_lacks_and_records_what_it_takes() -> None:
    rows = Rows()
    job = _queued_job(rows)
    now = utcnow()
    assert not set_job_state(rows, job, JobState.RUNNING, now=now)
    assert not set_job_state(rows, job, JobState.SUCCEEDED, now=now)
    assert not set_job_state(rows, job, JobState.QUEUED, now=now)
    assert set_job_state(rows, job, JobState.CANCELLED, reason="by the user", now=now)
    assert not set_job_state(rows, job, JobState.QUEUED, now=now)
    events = [r for r in rows if isinstance(r, JobEvent)]
    assert [(e.seq, e.state, e.reason) for e in events] == [
        (1, "queued", ""),
        (2, "cancelled", "by the user"),
    ]
    assert job.finished_at == now


def _attempt(state: AttemptState = AttemptState.SCHEDULED) -> JobAttempt:
    return JobAttempt(job_id="job_1", attempt=1, host_id="h", state=state.value, live=True)


def test_set_attempt_state_keeps_live_and_lost_in_step() -> None:
    now = utcnow()
    running = _attempt(AttemptState.RUNNING)
    assert not set_attempt_state(running, AttemptState.STARTING, now=now)
    assert set_attempt_state(running, AttemptState.SUCCEEDED, reason="", now=now)
    assert (running.live, running.lost, running.finished_at) == (False, False, now)
    lost = _attempt()
    assert set_attempt_state(lost, AttemptState.LOST, reason="host lost", now=now)
    assert (lost.state, lost.live, lost.lost, lost.reason) == ("lost", False, True, "host lost")
    assert not set_attempt_state(lost, AttemptState.RUNNING, now=now)


def test_the_scheduler_batch_checks_every_edge() -> None:
    rows = Rows()
    job = _queued_job(rows)
    now = utcnow()
    placed = schedule_jobs([Placement(job, "host_1", ["gpu-a"], 7)], now)
    assert (placed.jobs[0]["state"], placed.jobs[0]["event_seq"]) == ("scheduled", 2)
    assert (placed.attempts[0]["state"], placed.attempts[0]["live"]) == ("scheduled", True)
    assert (placed.events[0]["seq"], placed.events[0]["reason"]) == (2, "placed on host_1")
    set_job_state(rows, job, JobState.CANCELLED, now=now)
    with pytest.raises(InvalidTransition):
        schedule_jobs([Placement(job, "host_1", ["gpu-a"], 7)], now)


async def test_host_states_are_recorded_from_registration_on(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'hosts.db'}"
    await asyncio.to_thread(migrate.upgrade, url)
    db = Database(url)
    now = utcnow()
    try:
        async with db.transaction() as session:
            session.add(Tenant(id="provider", name="provider"))
            repo = RegistryRepository(session)
            host = new_host(
                repo, host_id="host_1", provider_tenant_id="provider", machine_id="m", now=now
            )
            host.hostname, host.price_per_gpu_hour, host.credential_hash = "h", 1, "x" * 64
            await repo.flush()
            later = now + timedelta(seconds=1)
            # Registered is not online: nothing but its daemon's hello (or a revocation)
            # moves it on, and it is never drained before it ran anything.
            assert not set_host_state(repo, host, HostState.DRAINED, "no job left", later)
            assert set_host_state(repo, host, HostState.ONLINE, "hello", later)
            assert set_host_state(repo, host, HostState.DRAINING, "DrainHost", later)
            assert not set_host_state(repo, host, HostState.DRAINING, "DrainHost", later)
            assert set_host_state(repo, host, HostState.LOST, "no heartbeat", later)
            assert not set_host_state(repo, host, HostState.DRAINED, "no job left", later)
        async with db.read() as session:
            history = await RegistryRepository(session).host_events("host_1")
            stored = await session.get(Host, "host_1")
        assert [(e.state, e.reason) for e in history] == [
            ("registered", "RegisterHost"),
            ("online", "hello"),
            ("draining", "DrainHost"),
            ("lost", "no heartbeat"),
        ]
        assert all(isinstance(e, HostEvent) for e in history)
        assert stored is not None
        assert stored.state == "lost"
    finally:
        await db.close()
