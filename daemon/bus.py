"""The daemon's side of NATS JetStream: take dispatches, publish reports (deduplicated) and logs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import nats
import nats.errors
import nkeys
from gpuplane.v1 import messaging_pb2
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from messaging.signing import SIGNATURE_HEADER, SigningKey
from messaging.subjects import LOG_END_HEADER, events_subject, report_msg_id
from messaging.tls import nats_tls_context

if TYPE_CHECKING:
    from daemon.identity import HostIdentity
    from daemon.settings import DaemonSettings

log = logging.getLogger(__name__)
_CREDS_JWT = re.compile(r"-----BEGIN NATS USER JWT-----\s*(\S+)\s*------END NATS USER JWT------")
_CREDS_SEED = re.compile(r"-----BEGIN USER NKEY SEED-----\s*(\S+)\s*------END USER NKEY SEED------")

OnDispatch = Callable[[Msg], Awaitable[None]]
ReportPublished = Callable[["messaging_pb2.JobReportKind.ValueType", float], None]
# How long a dispatch may stay un-acked before JetStream delivers it again, and how often.
DISPATCH_ACK_WAIT_SECONDS = 30.0
DISPATCH_MAX_DELIVER = 5


class UserCredentials:
    """A NATS user JWT and its nkey seed, from .creds text or a .creds file."""

    def __init__(self, jwt: str, seed: str) -> None:
        self.jwt = jwt
        self.seed = seed

    @classmethod
    def parse(cls, credentials: str) -> UserCredentials:
        text = credentials
        if "BEGIN NATS USER JWT" not in credentials:
            text = Path(credentials).read_text()
        jwt, seed = _CREDS_JWT.search(text), _CREDS_SEED.search(text)
        if jwt is None or seed is None:
            raise ValueError("NATS credentials hold no user JWT and nkey seed")
        return cls(jwt.group(1), seed.group(1))

    def replace(self, other: UserCredentials) -> None:
        self.jwt, self.seed = other.jwt, other.seed

    def jwt_bytes(self) -> bytes:
        return self.jwt.encode()

    def sign(self, nonce: str) -> bytes:
        pair = nkeys.from_seed(bytearray(self.seed.encode()))
        return base64.b64encode(pair.sign(nonce.encode()))


class DaemonBus:
    """One NATS connection: a durable pull consumer on this host's dispatch subject, reports
    to gpuplane.events.<host>.<job> with msg id <job>.<attempt>.<seq>, logs to
    gpuplane.logs.<host>.*."""

    def __init__(self, client: Client, credentials: UserCredentials | None = None) -> None:
        # The host's key: every report carries its signature (SIGNATURE_HEADER).
        self.signer: SigningKey | None = None
        self.client = client
        self.js: JetStreamContext = client.jetstream()
        self.credentials = credentials
        # Told each report's kind and seconds from publish to JetStream's ack (metrics).
        self.on_report_published: ReportPublished | None = None
        self._sub: JetStreamContext.PullSubscription | None = None

    @classmethod
    async def connect(
        cls,
        servers: list[str],
        credentials: str = "",
        inbox_prefix: str = "",
        tls: ssl.SSLContext | None = None,
    ) -> DaemonBus:
        """`credentials` is .creds text (what registration returned) or a .creds file path;
        a scoped user may subscribe only under its own `inbox_prefix`."""
        options: dict[str, object] = {
            "servers": servers,
            "name": "gpuplane-daemon",
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 1,
        }
        user = UserCredentials.parse(credentials) if credentials else None
        if user is not None:
            # Callbacks, not user_credentials: re-registration swaps the user in place and
            # the next (re)connect presents the new one.
            options["user_jwt_cb"] = user.jwt_bytes
            options["signature_cb"] = user.sign
        if inbox_prefix:
            options["inbox_prefix"] = inbox_prefix
        if tls is not None:
            options["tls"] = tls
        client = await nats.connect(**options)  # type: ignore[arg-type]
        return cls(client, user)

    def set_credentials(self, credentials: str) -> None:
        """New .creds (re-registration): used from the next reconnect on."""
        if self.credentials is not None and credentials:
            self.credentials.replace(UserCredentials.parse(credentials))

    async def subscribe(self, subject: str, stream: str, durable: str) -> None:
        self._sub = await self.js.pull_subscribe(
            subject,
            durable=durable,
            stream=stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=DISPATCH_ACK_WAIT_SECONDS,
                max_deliver=DISPATCH_MAX_DELIVER,
            ),
        )

    async def take_dispatches(self, on_dispatch: OnDispatch, may_take: Callable[[], bool]) -> None:
        """Fetches one dispatch at a time while `may_take()`; runs until cancelled."""
        assert self._sub is not None, "subscribe() first"
        while True:
            if not may_take():
                await asyncio.sleep(0.5)
                continue
            try:
                messages = await self._sub.fetch(1, timeout=5)
            except (nats.errors.TimeoutError, TimeoutError):  # nats-py raises either
                continue
            except nats.errors.Error as exc:
                log.warning("fetching dispatches failed: %s", exc)
                await asyncio.sleep(1)
                continue
            for message in messages:
                await on_dispatch(message)

    async def publish_report(self, report: messaging_pb2.JobReport) -> None:
        """Publishes until JetStream acks it; the msg id makes retries harmless."""
        headers = {"Nats-Msg-Id": report_msg_id(report.job_id, report.attempt, report.seq)}
        data = report.SerializeToString()
        if self.signer is not None:
            headers[SIGNATURE_HEADER] = self.signer.header(data)
        delay = 0.2
        started = time.perf_counter()
        while True:
            try:
                await self.js.publish(
                    events_subject(report.host_id, report.job_id),
                    data,
                    timeout=5,
                    headers=headers,
                )
                if self.on_report_published is not None:
                    self.on_report_published(report.kind, time.perf_counter() - started)
                return
            except (nats.errors.Error, OSError) as exc:
                log.warning(
                    "publishing report %s/%s seq %d failed (%s); retrying in %.1fs",
                    report.job_id,
                    report.attempt,
                    report.seq,
                    exc,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def publish_log(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        """Chunks go out as plain publishes (the LOGS stream stores them, no ack round trip);
        the end marker waits for JetStream's ack. NATS keeps one connection's messages in
        order, so once the marker is stored the chunks before it are too."""
        if LOG_END_HEADER in headers:
            await self.js.publish(subject, data, timeout=5, headers=headers)
        else:
            await self.client.publish(subject, data, headers=headers)

    async def close(self) -> None:
        """Sends what is still buffered (log lines are published without an ack) and closes.
        Not drain(): with the dispatch pull subscription it waits out its whole timeout
        (30 s) and then logs a DrainTimeoutError."""
        if self.client.is_connected:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self.client.flush(timeout=2)
        await self.client.close()


async def connect_bus(settings: DaemonSettings, identity: HostIdentity) -> DaemonBus:
    """The daemon's bus, with the NATS user its registration gave it (servers from the
    settings when set), signing its reports with the host's key."""
    servers = settings.nats_url.split(",") if settings.nats_url else identity.nats_servers
    bus = await DaemonBus.connect(
        servers,
        identity.nats_credentials,
        identity.nats_inbox_prefix,
        tls=nats_tls_context(
            settings.nats_ca_file, settings.nats_cert_file, settings.nats_key_file
        ),
    )
    bus.signer = SigningKey.load_or_create(settings.signing_key_file)
    return bus
