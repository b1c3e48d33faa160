"""Short ids, as Nomad takes them: shown as the shortest unique prefix, resolved on the server."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gpuplane.v1 import jobs_pb2, registry_pb2

from gpuplane_cli.client import EXIT_NOT_FOUND, EXIT_USAGE, CliError, Context

_HEX = re.compile(r"[0-9a-f]{32}")
_PREFIX = re.compile(r"[0-9a-z_]{1,40}")  # what ListJobs/ListHosts take as id_prefix
# How many matches an ambiguous prefix lists before "...".
_SHOWN_MATCHES = 5


@dataclass(frozen=True)
class Kind:
    """A kind of id: its prefix (`job_`) and the argument names that carry one."""

    noun: str
    prefix: str
    attrs: tuple[str, ...]
    # Other prefixes of ids of this kind, taken as given: a session (`ses_…`) is a job too.
    others: tuple[str, ...] = ()

    def full(self, text: str) -> bool:
        return any(
            text.startswith(prefix) and bool(_HEX.fullmatch(text[len(prefix) :]))
            for prefix in (self.prefix, *self.others)
        )

    def starts(self, text: str) -> list[str]:
        """`text` as the starts of ids: as given when it has one of this kind's prefixes,
        else with each of them (`3f9a`: a job's `job_3f9a` or a session's `ses_3f9a`)."""
        prefixes = (self.prefix, *self.others)
        if text.startswith(prefixes):
            return [text]
        return [prefix + text for prefix in prefixes]


JOB = Kind("job", "job_", ("job_id", "job_ids", "job"), ("ses_",))  # `job`: ledger --job
HOST = Kind("host", "host_", ("host_id", "host_ids"))
SESSION = Kind("session", "ses_", ("session_id",))


async def resolve_args(args: argparse.Namespace, ctx: Context) -> None:
    """Replaces every short job, host or session id among the arguments with the full one."""
    for kind in (JOB, HOST, SESSION):
        for attr in kind.attrs:
            value = getattr(args, attr, None)
            if isinstance(value, str) and value:
                setattr(args, attr, await resolve(ctx, kind, value))
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                setattr(args, attr, [await resolve(ctx, kind, v) for v in value])


async def resolve(ctx: Context, kind: Kind, text: str) -> str:
    """The one id of `kind` that starts with `text` (`3f9a` or `job_3f9a`) that the caller
    may read. A full id is returned as given, without a call."""
    if kind.full(text):
        return text
    starts = kind.starts(text.strip().lower())
    if not all(_PREFIX.fullmatch(prefix) for prefix in starts):
        raise CliError(f"{text!r} is not a {kind.noun} id nor the start of one", EXIT_USAGE)
    matches = [found for prefix in starts for found in await _matching(ctx, kind, prefix)]
    if not matches:
        # Worded as the server's NOT_FOUND for a full id, which scripts may match.
        raise CliError(f"NOT_FOUND: no {kind.noun} matches {text!r}", EXIT_NOT_FOUND)
    if len(matches) > 1:
        shown = ", ".join(matches[:_SHOWN_MATCHES]) + (
            ", ..." if len(matches) > _SHOWN_MATCHES else ""
        )
        raise CliError(
            f"{text!r} matches {len(matches)} {kind.noun}s: {shown} (give more of the id)",
            EXIT_USAGE,
        )
    return matches[0]


async def _matching(ctx: Context, kind: Kind, prefix: str) -> Sequence[str]:
    """Up to a page of the ids starting with `prefix` (enough to say it is ambiguous)."""
    client = ctx.client()
    if kind in (JOB, SESSION):  # a session is a job: ListJobs finds it by its prefix
        jobs = await client.call(
            client.jobs.ListJobs, jobs_pb2.ListJobsRequest(id_prefix=prefix, page_size=50)
        )
        return [j.job_id for j in jobs.jobs]
    hosts = await client.call(
        client.registry.ListHosts, registry_pb2.ListHostsRequest(id_prefix=prefix, page_size=50)
    )
    return [h.host_id for h in hosts.hosts]
