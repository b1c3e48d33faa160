"""The control plane's NATS connection: connect with retry, ensure the JetStream streams."""

from __future__ import annotations

import asyncio
import logging
import ssl

import nats
from nats.aio.client import Client, RawCredentials
from nats.js import JetStreamContext

from controlplane.errors import Unavailable
from messaging.subjects import ensure_streams

log = logging.getLogger(__name__)


class Bus:
    """Holds one NATS connection; `ready` is set once JetStream streams exist."""

    def __init__(
        self,
        servers: str,
        replicas: int = 1,
        tls: ssl.SSLContext | None = None,
        credentials: str = "",
    ) -> None:
        self.servers = [s.strip() for s in servers.split(",") if s.strip()]
        self.replicas = replicas
        self.tls = tls
        # .creds text of the control plane's own NATS user ("" = open server).
        self.credentials = credentials
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.ready = asyncio.Event()

    async def jetstream(self, timeout: float = 5.0) -> JetStreamContext:
        """The JetStream context once connected; Unavailable when NATS is not reachable
        within `timeout` seconds (the connection keeps retrying meanwhile)."""
        try:
            await asyncio.wait_for(self.ready.wait(), timeout=timeout)
        except TimeoutError:
            raise Unavailable("the message bus is not reachable; try again") from None
        assert self.js is not None
        return self.js

    async def connect(self) -> None:
        """Connects, retrying with backoff until it works (the API serves meanwhile)."""
        delay = 0.2
        while True:
            try:
                self.nc = await nats.connect(
                    servers=self.servers,
                    name="gpuplane-controlplane",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    # Verified against the configured CA (else the system's roots) when the
                    # server requires TLS or a URL is tls://.
                    tls=self.tls,
                    user_credentials=RawCredentials(self.credentials) if self.credentials else None,
                )
                self.js = self.nc.jetstream()
                await ensure_streams(self.js, self.replicas)
                self.ready.set()
                log.info("connected to NATS at %s", ",".join(self.servers))
                return
            except (OSError, TimeoutError, nats.errors.Error) as error:
                log.warning("NATS not reachable (%s); retrying in %.1fs", error, delay)
                if self.nc is not None:
                    await self.nc.close()
                    self.nc = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        """Closes the connection; callers stop their consumers first, so nothing is in flight
        that a drain would wait for (a drain can take its full 30 s timeout)."""
        if self.nc is not None:
            await self.nc.close()
            self.nc = None
            self.js = None
