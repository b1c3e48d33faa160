"""One shape for every state machine: a table of edges, each with why it is taken.

Each stateful entity has a `states.py` beside its models (jobs/states.py, registry/states.py,
ledger/states.py ...) that declares its StrEnum, builds one `StateMachine` from a table
`{from_state: {to_state: "why this edge is taken"}}` and holds the entity's only setter
(which calls `machine.check`, assigns the state and records the change in the entity's
history) plus the function that creates the entity with its first state through the same
setter path. Bulk writers (a scheduler cycle) use a batch form that still calls `check` for
every row. This is the pattern of Ray's autoscaler v2 (`get_valid_transitions`,
`set_status`, `_record_status_transition`).

`MACHINES` lists every machine, so one test can walk them all and `scripts/gen-design`
can draw each one into docs/DESIGN.md from the same tables the code enforces.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

S = TypeVar("S", bound=StrEnum)


@dataclass(frozen=True, slots=True)
class Edge(Generic[S]):
    source: S
    target: S
    why: str


class InvalidTransition(Exception):
    """A setter was asked for an edge its table does not allow (a bug in the caller, not
    bad input: client mistakes are refused before a setter is called)."""


class StateMachine(Generic[S]):
    """The states of one entity, the edges between them and why each is taken."""

    def __init__(
        self,
        entity: str,
        states: type[S],
        initial: S,
        table: Mapping[S, Mapping[S, str]],
    ) -> None:
        missing = set(states) - set(table)
        if missing:
            raise ValueError(f"{entity}: no row for {sorted(missing)}")
        for source, targets in table.items():
            for target, why in targets.items():
                if target == source or not why.strip():
                    raise ValueError(f"{entity}: edge {source} → {target} needs a reason")
        self.entity = entity
        self.states = states
        self.initial = initial
        self._table = {source: dict(targets) for source, targets in table.items()}

    def allows(self, current: S, target: S) -> bool:
        return target in self._table[current]

    def check(self, current: S, target: S) -> bool:
        """True when the setter should move `current` to `target`; False for a no-op (the
        entity is already there, or a stale or replayed change asks for an edge that no
        longer applies). Setters return this so callers know whether anything changed."""
        return current != target and target in self._table[current]

    def require(self, current: S, target: S) -> None:
        """For callers that must not be ignored: raises InvalidTransition unless allowed."""
        if not self.allows(current, target):
            raise InvalidTransition(f"{self.entity}: {current} → {target} is not an edge")

    def targets(self, current: S) -> frozenset[S]:
        return frozenset(self._table[current])

    @property
    def terminal(self) -> frozenset[S]:
        return frozenset(s for s, targets in self._table.items() if not targets)

    def edges(self) -> Iterator[Edge[S]]:
        for source, targets in self._table.items():
            for target, why in targets.items():
                yield Edge(source, target, why)

    def mermaid(self) -> str:
        """The machine as a Mermaid state diagram (docs/DESIGN.md is generated from this)."""
        lines = ["stateDiagram-v2", f"    [*] --> {self.initial.value}"]
        for edge in self.edges():
            why = edge.why.replace(":", " -").replace(";", ",")
            lines.append(f"    {edge.source.value} --> {edge.target.value}: {why}")
        lines.extend(f"    {state.value} --> [*]" for state in sorted(self.terminal))
        return "\n".join(lines)


# Every machine, by entity name; each states.py registers its machine here on import.
MACHINES: dict[str, StateMachine[StrEnum]] = {}


def register(machine: StateMachine[S]) -> StateMachine[S]:
    if machine.entity in MACHINES:
        raise ValueError(f"a state machine for {machine.entity} is already registered")
    MACHINES[machine.entity] = machine  # type: ignore[assignment]
    return machine


def all_machines() -> dict[str, StateMachine[StrEnum]]:
    """Every machine of the control plane: imports each `states` module under controlplane/
    (each registers its machines on import), then returns the registry."""
    import controlplane

    for module in pkgutil.walk_packages(controlplane.__path__, "controlplane."):
        if module.name.rsplit(".", 1)[-1] == "states":
            importlib.import_module(module.name)
    return MACHINES


T = TypeVar("T")


def produces(table: T) -> T:
    """Declares a table whose states a setter is given as computed targets (such as
    `set_attempt_state(attempt, ATTEMPT_ENDING[target])`); returns it unchanged. The edge
    coverage test counts every `XState.Y` written inside `produces(...)` as produced, as it
    counts a literal `XState.Y` target of a setter call or of `check`/`require`."""
    return table
