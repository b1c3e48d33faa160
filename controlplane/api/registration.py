"""How the servicers are put on the gRPC server: by their generic handlers only."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import grpc
from grpc import aio

from controlplane.api.interceptors import Handler

if TYPE_CHECKING:
    GenericHandler = grpc.GenericRpcHandler[Any, Any]
else:
    GenericHandler = grpc.GenericRpcHandler


class GenericHandlersOnly:
    """What the generated `add_*Servicer_to_server` functions (and health and reflection) are
    given in place of the grpc.aio server: each service's generic handler reaches the server,
    its "registered methods" do not.

    For every registered method, grpc.aio keeps one call requested from the core and, to
    accept the next RPC, awaits all of those requests at once (`asyncio.wait` over one future
    per method). That wait is paid on the one event loop for every RPC, in proportion to the
    number of methods: with this server's ~70 it cost about 70 µs a call, 16 % of an
    authenticated no-op's server CPU (`scripts/bench` authenticated_noop_rpc). A generic handler
    is found with one dict lookup per service, and every method still gets the same handler,
    the Gate interceptor included."""

    def __init__(
        self,
        server: aio.Server,
        keep: Callable[[Sequence[GenericHandler]], None] = lambda handlers: None,
    ) -> None:
        self._server = server
        self._keep = keep  # told each service's handler too (api/keeper.KeptServer)

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[GenericHandler]) -> None:
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)
        self._keep(generic_rpc_handlers)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, Handler]
    ) -> None:
        """Dropped: each of these methods is in the service's generic handler too."""

    def as_server(self) -> aio.Server:
        """This registrar typed as the server the generated functions ask for (they call only
        the two methods above)."""
        return cast(aio.Server, self)
