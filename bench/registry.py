"""The benchmark registry: figures, the floors they are compared with, and their results."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from bench.resources import Resources

Better = Literal["higher", "lower"]


@dataclass
class RunContext:
    """What a benchmark may use: its time budget, shared servers and load settings."""

    duration: float
    resources: Resources
    workdir: Path
    client_processes: int
    concurrency: int
    # Results measured earlier in this run, by name (a figure may reuse its floor's setup).
    results: dict[str, Result] = field(default_factory=dict)


@dataclass
class Measurement:
    """What one benchmark run produced: its headline figure and supporting numbers."""

    figure: float
    details: dict[str, float | int | str] = field(default_factory=dict)


Runner = Callable[[RunContext], Awaitable[Measurement]]


@dataclass(frozen=True)
class Benchmark:
    """A named measurement. A floor is the cost of the raw ingredient (a bare gRPC echo, one
    SQL transaction); a figure names its floor, and its ratio to the floor, measured in the
    same run on the same machine, is what is tracked across machines and changes."""

    name: str
    unit: str
    better: Better
    run: Runner
    description: str
    floor: str | None = None
    # For a figure: the ratio to aim for, a minimum when higher is better, else a maximum.
    target: float | None = None
    # The figure itself to reach (an issue's absolute target on the reference machine),
    # checked as well as the ratio where both are given.
    minimum: float | None = None
    # The same for a figure where lower is better: the most it may be.
    maximum: float | None = None
    # Seconds it may take beyond three times the run's duration (None: the run's default).
    allowance: float | None = None


@dataclass
class Result:
    name: str
    figure: float | None
    unit: str
    floor: float | None
    floor_name: str | None
    ratio: float | None
    target: float | None
    better: Better
    seconds: float
    details: dict[str, float | int | str] = field(default_factory=dict)
    error: str | None = None
    minimum: float | None = None
    maximum: float | None = None

    @property
    def meets_target(self) -> bool | None:
        checks: list[bool] = []
        if self.ratio is not None and self.target is not None:
            higher = self.better == "higher"
            checks.append(self.ratio >= self.target if higher else self.ratio <= self.target)
        if self.figure is not None and self.minimum is not None:
            checks.append(self.figure >= self.minimum)
        if self.figure is not None and self.maximum is not None:
            checks.append(self.figure <= self.maximum)
        return all(checks) if checks else None

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "figure": self.figure,
            "unit": self.unit,
            "floor": self.floor,
            "ratio": self.ratio,
            "target": self.target,
            "floor_name": self.floor_name,
            "better": self.better,
            "minimum": self.minimum,
            "maximum": self.maximum,
            "meets_target": self.meets_target,
            "seconds": round(self.seconds, 3),
            "details": self.details,
            "error": self.error,
        }


REGISTRY: dict[str, Benchmark] = {}


def benchmark(
    name: str,
    *,
    unit: str,
    better: Better,
    description: str,
    floor: str | None = None,
    target: float | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    allowance: float | None = None,
) -> Callable[[Runner], Runner]:
    """Registers the decorated coroutine function as benchmark `name`."""

    def register(run: Runner) -> Runner:
        if name in REGISTRY:
            raise ValueError(f"benchmark {name!r} registered twice")
        REGISTRY[name] = Benchmark(
            name, unit, better, run, description, floor, target, minimum, maximum, allowance
        )
        return run

    return register


def plan(names: Iterable[str]) -> list[Benchmark]:
    """The benchmarks to run for `names`, each figure's floor included, floors first."""
    chosen: dict[str, Benchmark] = {}
    for name in names:
        if name not in REGISTRY:
            known = ", ".join(sorted(REGISTRY))
            raise KeyError(f"no benchmark {name!r} (known: {known})")
        bench = REGISTRY[name]
        if bench.floor is not None:
            chosen.setdefault(bench.floor, REGISTRY[bench.floor])
        chosen.setdefault(name, bench)
    return sorted(chosen.values(), key=lambda b: (b.floor is not None, _order(b.name)))


def _order(name: str) -> int:
    return list(REGISTRY).index(name)


def ratio_of(result: Measurement, floor: Result | None) -> float | None:
    if floor is None or floor.figure in (None, 0) or floor.error:
        return None
    assert floor.figure is not None
    return result.figure / floor.figure
