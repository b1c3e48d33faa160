"""The gateway's routing table: each service's tenant, name, port, ready replicas and keys."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.gateway.repository import RouteRepository
from controlplane.jobs.states import JobState
from controlplane.services.keys_repository import ServiceKeyRepository
from controlplane.services.service import spec_of
from controlplane.services.states import ServiceState


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    """One service as the gateway routes to it (immutable: a change is a new Route)."""

    service_id: str
    tenant_id: str
    name: str
    active: bool
    port: int
    # Its routable replicas, (job id, host id): RUNNING, probed ready, not being retired.
    replicas: tuple[tuple[str, str], ...] = ()
    # Its caller keys not revoked: secret hash → key id.
    keys: Mapping[str, str] = field(default_factory=dict)

    @property
    def replica_ids(self) -> tuple[str, ...]:
        return tuple(job_id for job_id, _ in self.replicas)


async def read_routes(session: AsyncSession, service_ids: Sequence[str] | None) -> dict[str, Route]:
    """The routes of `service_ids` that are not deleted (None: of every such service)."""
    repo = RouteRepository(session)
    services = await repo.services(service_ids)
    ids = None if service_ids is None else [s.id for s in services]
    if ids == []:
        return {}
    ready: dict[str, list[tuple[str, str]]] = {s.id: [] for s in services}
    for row in await repo.replicas(ids):
        routable = row.ready and not row.retired and row.state == JobState.RUNNING.value
        if routable and row.service_id in ready:
            ready[row.service_id].append((row.job_id, row.host_id))
    keys: dict[str, dict[str, str]] = {s.id: {} for s in services}
    for service_id, key_id, digest in await ServiceKeyRepository(session).live_hashes(ids):
        if service_id in keys:
            keys[service_id][digest] = key_id
    return {
        s.id: Route(
            service_id=s.id,
            tenant_id=s.tenant_id,
            name=s.name,
            active=s.state == ServiceState.ACTIVE.value,
            port=spec_of(s).service_replica.port,
            replicas=tuple(sorted(ready[s.id])),
            keys=keys[s.id],
        )
        for s in services
    }


class RouteTable:
    """Routes by service id, by (tenant, name) and by caller key hash; read per request,
    written only by the RouteWatcher (whole, or a few services at a time)."""

    def __init__(self) -> None:
        self._by_id: dict[str, Route] = {}
        self._by_name: dict[tuple[str, str], Route] = {}
        self._by_key: dict[str, Route] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, service_id: str) -> Route | None:
        return self._by_id.get(service_id)

    def named(self, tenant_id: str, name: str) -> Route | None:
        return self._by_name.get((tenant_id, name))

    def keyed(self, digest: str) -> Route | None:
        """The service a caller key (by its secret's hash) reaches, if it is not revoked."""
        return self._by_key.get(digest)

    def replace(self, routes: Mapping[str, Route]) -> None:
        """Every route at once (a full load)."""
        self._by_id, self._by_name, self._by_key = {}, {}, {}
        for route in routes.values():
            self._put(route)

    def update(self, service_ids: Collection[str], routes: Mapping[str, Route]) -> None:
        """The routes of `service_ids` as read now: those not in `routes` are gone."""
        for service_id in service_ids:
            old = self._by_id.pop(service_id, None)
            if old is not None:
                if self._by_name.get((old.tenant_id, old.name)) is old:
                    del self._by_name[(old.tenant_id, old.name)]
                for digest in old.keys:
                    if self._by_key.get(digest) is old:
                        del self._by_key[digest]
            route = routes.get(service_id)
            if route is not None:
                self._put(route)

    def _put(self, route: Route) -> None:
        self._by_id[route.service_id] = route
        self._by_name[(route.tenant_id, route.name)] = route
        for digest in route.keys:
            self._by_key[digest] = route
