"""What watches a running attempt besides its executor: the moving deadline of a session or
a service replica (daemon/sessions.py) and a replica's health probe (daemon/health.py)."""

from __future__ import annotations

from collections.abc import Callable

from daemon.executor import JobExecutor
from daemon.health import ReplicaHealth, Send
from daemon.runtime import DockerRuntime
from daemon.sessions import SessionDeadline, deadline_cap, has_moving_deadline

Key = tuple[str, int]


class AttemptWatchers:
    """Started with each executor (`start`), closed when its attempt ends here (`close`)."""

    def __init__(self, runtime: Callable[[], DockerRuntime | None], send: Send) -> None:
        self.runtime = runtime
        self.send = send
        self.deadlines: dict[Key, SessionDeadline] = {}  # of the running sessions and replicas
        self.healths: dict[Key, ReplicaHealth] = {}  # of the running service replicas

    def start(self, key: Key, executor: JobExecutor) -> None:
        spec = executor.dispatch.spec
        if spec.HasField("service_replica"):
            health = ReplicaHealth(executor, self.container_pid, self.send)
            self.healths[key] = health
            health.start()
        if has_moving_deadline(spec):
            deadline = SessionDeadline(executor, spec.max_duration_seconds, cap=deadline_cap(spec))
            self.deadlines[key] = deadline
            deadline.start()

    def close(self, key: Key) -> None:
        if (deadline := self.deadlines.pop(key, None)) is not None:
            deadline.close()
        if (health := self.healths.pop(key, None)) is not None:
            health.close()

    def container_pid(self, container_id: str) -> int:
        """The container's main process id (0 when it is not running), blocking."""
        runtime = self.runtime()
        assert runtime is not None
        attrs = runtime.client.api.inspect_container(container_id)
        return int(attrs["State"]["Pid"] or 0)
