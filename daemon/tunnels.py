"""Tunnels the control plane asks for: the daemon calls the named replica back and relays
bytes between that call and an exec in (or a connection into) one of its own containers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from typing import TYPE_CHECKING, TypeAlias

import docker
import grpc
from gpuplane.v1 import tunnels_pb2, tunnels_pb2_grpc

from daemon import rawpath
from daemon.channel import open_channel
from daemon.exec_io import Demux, ExecSession, start_exec
from daemon.netns import Connector
from daemon.progress import Progress
from messaging.rawpath import connect_socket

if TYPE_CHECKING:
    from daemon.agent import Agent

log = logging.getLogger(__name__)
Frame = tunnels_pb2.TunnelFrame
Call: TypeAlias = "grpc.aio.StreamStreamCall[tunnels_pb2.TunnelFrame, tunnels_pb2.TunnelFrame]"
# Bytes read from the container per frame: bounded, like every hop's (the control plane takes
# at most 256 KiB a frame).
CHUNK = 256 * 1024
# After the exit code: how long the control plane may take to end the call.
_END_GRACE = 5.0


class Refused(RuntimeError):
    """The tunnel cannot be opened here; said to the client."""


class NotRunning(OSError):
    """The attempt runs but its container has no process now (a replica between restarts):
    this connection fails, a standing pool lives on (an OSError, not Refused)."""


class Tunnels:
    """Opens the tunnels the control plane's TunnelCommands ask for, each on its own task,
    over a call back to the replica the command names: the daemon's own channel when that is
    its one control-plane address, else a channel per address (same TLS), kept."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.opened = 0
        # Container id → the thread that connects inside its network namespace.
        self._connectors: dict[str, Connector] = {}
        self.standing: dict[str, rawpath.StandingPool] = {}

    def open(self, command: tunnels_pb2.TunnelCommand) -> None:
        if command.standing and command.data_address:
            self.agent._spawn(self.keep_standing(command))
        else:
            self.agent._spawn(self.serve(command))

    async def keep_standing(self, command: tunnels_pb2.TunnelCommand) -> None:
        """Standing connections for the gateway (daemon/rawpath.py), until their replica
        refuses them or the attempt ends."""

        async def connect() -> socket.socket:
            return await self._connect_port(command)

        def running() -> bool:
            try:
                self._container(command)
            except Refused:
                return False
            return True

        pool = rawpath.StandingPool(self.agent, command, connect, running)
        self.standing[command.tunnel_id] = pool
        try:
            await pool.run()
        finally:
            self.standing.pop(command.tunnel_id, None)

    async def close(self) -> None:
        for connector in self._connectors.values():
            connector.close()
        self._connectors.clear()
        for channel in self._channels.values():
            await channel.close(grace=None)
        self._channels.clear()

    def _channel(self, address: str) -> grpc.aio.Channel:
        settings = self.agent.settings
        own = self.agent._channel
        if own is not None and (not address or address == settings.control_plane.strip()):
            return own
        if address not in self._channels:
            self._channels[address] = open_channel(address, settings.channel_security())
        return self._channels[address]

    async def serve(self, command: tunnels_pb2.TunnelCommand) -> None:
        """Calls back, names the tunnel, opens what it asks for and relays until either end
        is done; a client that goes away (the call ends) closes the exec or connection."""
        assert self.agent.identity is not None
        stub = tunnels_pb2_grpc.TunnelRelayServiceStub(self._channel(command.address))
        metadata = (("authorization", f"Bearer {self.agent.identity.host_credential}"),)
        call: Call = stub.Tunnel(metadata=metadata)  # type: ignore[call-arg]
        self.opened += 1
        try:
            await call.write(Frame(tunnel_id=command.tunnel_id))
            try:
                endpoint = await self._endpoint(command)
            except (Refused, OSError, docker.errors.DockerException) as exc:
                # One line (the control plane refuses control characters), bounded.
                said = " ".join(str(exc).split())[:500] or type(exc).__name__
                await _say_error(call, said)
                return
            try:
                if command.data_address and command.WhichOneof("target") == "port":
                    await self._relay_raw(call, command, endpoint)
                else:
                    await Relay(call, endpoint).run()
            finally:
                endpoint.sock.close()
                if endpoint.session is not None and not endpoint.session.exited:
                    _hang_up(endpoint.session)
        except grpc.aio.AioRpcError as exc:
            log.info("tunnel %s… ended: %s", command.tunnel_id[:6], exc.code().name)
        finally:
            call.cancel()

    async def _relay_raw(
        self, call: Call, command: tunnels_pb2.TunnelCommand, endpoint: Endpoint
    ) -> None:
        try:
            data: rawpath.Streams | socket.socket
            if command.data_tls:
                data = await rawpath.open_data(self.agent, command)
            else:
                data = await connect_socket(command.data_address, command.tunnel_id)
        except OSError as exc:
            await _say_error(call, f"the control plane's data port: {exc}"[:500])
            return
        await rawpath.relay(call, endpoint.sock, data)

    def _container(self, command: tunnels_pb2.TunnelCommand) -> str:
        """The running container of the command's attempt; Refused when there is none."""
        executor = self.agent.executors.get((command.job_id, command.attempt))
        container_id = executor.container_id if executor is not None else ""
        if executor is None or executor.progress is not Progress.RUNNING or not container_id:
            raise Refused(f"job {command.job_id} attempt {command.attempt} is not running here")
        return container_id

    async def _connect_port(self, command: tunnels_pb2.TunnelCommand) -> socket.socket:
        """A connection to the command's port in its attempt's container, through the
        container's connector thread (started on first use; a failed connect lets it go, so
        a container restarted under the same id is looked up again)."""
        container_id = self._container(command)
        self._prune()
        connector = self._connectors.get(container_id)
        if connector is None:
            assert self.agent._runtime is not None
            api = self.agent._runtime.client.api
            attrs = await asyncio.to_thread(api.inspect_container, container_id)
            pid = int(attrs["State"]["Pid"] or 0)
            if not pid:  # exited: a replica waiting for its restart in place
                raise NotRunning(
                    f"job {command.job_id} attempt {command.attempt}: its container is not "
                    "running now (a replica restarting in place); try again shortly"
                )
            connector = Connector(pid)
            if container_id in self._connectors:  # another call started one meanwhile
                connector.close()
            connector = self._connectors.setdefault(container_id, connector)
        try:
            return await connector.connect(command.port)
        except OSError:
            if self._connectors.get(container_id) is connector:
                self._connectors.pop(container_id).close()
            raise

    def _prune(self) -> None:
        """Lets the connector threads of containers no longer run here go."""
        live = {e.container_id for e in self.agent.executors.values()}
        for gone in set(self._connectors) - live:
            self._connectors.pop(gone).close()

    async def _endpoint(self, command: tunnels_pb2.TunnelCommand) -> Endpoint:
        """The exec or connection the command asks for, in its attempt's own container."""
        agent = self.agent
        container_id = self._container(command)
        assert agent._runtime is not None
        client = agent._runtime.client
        if command.WhichOneof("target") == "port":
            try:
                sock = await self._connect_port(command)
            except ConnectionRefusedError:
                raise Refused(f"nothing listens on port {command.port} in the container") from None
            return Endpoint(sock)
        spec = command.exec
        session = await asyncio.to_thread(
            start_exec,
            client,
            container_id,
            list(spec.command),
            tty=spec.tty,
            stdin=spec.stdin,
            size=(spec.size.rows, spec.size.cols),
        )
        return Endpoint(session.sock, session)


def _hang_up(session: ExecSession) -> None:
    """Ends an exec whose client went away (ExecSession.hang_up), in a thread of its own: the
    tunnel's task ends now, also when it was cancelled (the daemon stopping)."""

    def work() -> None:
        try:
            done = session.hang_up()
        except (docker.errors.DockerException, OSError) as exc:  # the engine went away
            log.info("exec %s…: not hung up: %s", session.exec_id[:12], exc)
            return
        if done:
            log.info("exec %s… outlived its client: %s", session.exec_id[:12], done)

    threading.Thread(target=work, name="exec-hangup", daemon=True).start()


async def _say_error(call: Call, said: str) -> None:
    """The tunnel's last word: the error, then the end of the call once the control plane
    ended it (cancelling at once could drop the error on its way)."""
    await call.write(Frame(error=said))
    await call.done_writing()
    with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
        await asyncio.wait_for(call.code(), _END_GRACE)


class Endpoint:
    """The container's end of a tunnel: a non-blocking socket, and the exec it belongs to."""

    def __init__(self, sock: socket.socket, session: ExecSession | None = None) -> None:
        self.sock = sock
        self.session = session


class Relay:
    """Frames between the call and the socket, one at a time, each write awaited: the
    socket is read only as fast as the call takes frames (gRPC flow control), and the call
    read only as fast as the socket takes bytes."""

    def __init__(self, call: Call, endpoint: Endpoint) -> None:
        self.call = call
        self.endpoint = endpoint
        self.client_closed = asyncio.Event()

    async def run(self) -> None:
        down = asyncio.create_task(self._down())
        up = asyncio.create_task(self._up())
        try:
            await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
            if down.done():
                down.result()
                await self.call.done_writing()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(up), _END_GRACE)
        finally:
            for task in (down, up):
                task.cancel()
            await asyncio.gather(down, up, return_exceptions=True)

    async def _down(self) -> None:
        """Container → call: output (split by stream without a tty), then for an exec its
        exit code, for a connection close_write once the client closed its side too."""
        loop = asyncio.get_running_loop()
        session = self.endpoint.session
        demux = Demux() if session is not None and not session.tty else None
        pending = session.early if session is not None else b""
        while True:
            data = pending or await loop.sock_recv(self.endpoint.sock, CHUNK)
            pending = b""
            if not data:
                break
            if demux is None:
                await self.call.write(Frame(data=data))
                continue
            for kind, piece in demux.feed(data):
                for at in range(0, len(piece), CHUNK):
                    part = piece[at : at + CHUNK]
                    frame = Frame(stderr=part) if kind == 2 else Frame(data=part)
                    await self.call.write(frame)
        if session is not None:
            code = await asyncio.to_thread(session.exit_code)
            await self.call.write(Frame(exit_code=code))
            return
        await self.call.write(Frame(close_write=True))
        await self.client_closed.wait()

    async def _up(self) -> None:
        """Call → container: stdin or bytes, resizes, the client's half-close."""
        loop = asyncio.get_running_loop()
        sock = self.endpoint.sock
        async for frame in self.call:
            kind = frame.WhichOneof("msg")
            if kind == "data":
                try:
                    await loop.sock_sendall(sock, frame.data)
                except OSError:  # the other end closed: nothing more goes in
                    pass
            elif kind == "resize" and self.endpoint.session is not None:
                size = frame.resize
                await asyncio.to_thread(self.endpoint.session.resize, size.rows, size.cols)
            elif kind == "close_write":
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                self.client_closed.set()
