"""Figures: what gpuplane itself achieves, each compared with the floor it is built on."""

from __future__ import annotations

from bench.load import LoadSpec, run_load
from bench.registry import Measurement, RunContext, benchmark
from bench.resources import ServerProcess


@benchmark(
    "authenticated_noop_rpc",
    unit="calls/s",
    better="higher",
    floor="grpc_echo_qps",
    target=0.8,
    description="AdminService/WhoAmI with a bearer key against the real control plane (SQLite, "
    "own process, NATS and S3 up), same clients and load as grpc_echo_qps",
)
async def authenticated_noop_rpc(ctx: RunContext) -> Measurement:
    nats = await ctx.resources.nats()
    s3 = await ctx.resources.s3()
    data_dir = ctx.workdir / "controlplane"
    server = ServerProcess(
        "controlplane",
        ctx.workdir / "controlplane-server.log",
        f"--data-dir={data_dir}",
        f"--nats-url={nats.url}",
        f"--s3-endpoint={s3.endpoint}",
        f"--s3-access-key={s3.access_key}",
        f"--s3-secret-key={s3.secret_key}",
    )
    async with server:
        ready = await server.start()
        spec = LoadSpec(
            target=f"127.0.0.1:{ready['port']}",
            method="/gpuplane.v1.AdminService/WhoAmI",
            metadata=[("authorization", f"Bearer {ready['admin_key']}")],
            concurrency=ctx.concurrency,
            duration=ctx.duration,
        )
        summary = await run_load(spec, ctx.client_processes, server_pid=server.pid)
    if summary.calls == 0:
        raise RuntimeError(f"no call succeeded: {summary.first_error or 'no answer'}")
    details = summary.details()
    details["clients"] = f"{ctx.client_processes} processes × {ctx.concurrency} callers"
    return Measurement(summary.qps, details)
