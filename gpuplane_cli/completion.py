"""`gpuplane completion bash|zsh|fish` (argcomplete); job and host ids complete from the API."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
from collections.abc import Awaitable, Callable
from typing import Any

from gpuplane_cli import args as a
from gpuplane_cli.client import EXIT_OK, Client, Context, Target
from gpuplane_cli.hints import all_parsers
from gpuplane_cli.output import enum_name

SHELLS = ("bash", "zsh", "fish")
# An id lookup gives up after this long: a shell waits for it on every Tab.
LOOKUP_TIMEOUT = 2.0
# Ids offered at most (one page of the newest): enough to pick from.
LOOKUP_PAGE = 500


def register(subparsers: a.Subparsers) -> None:
    parser = subparsers.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print the completion script for SHELL. Load it with "
        "`source <(gpuplane completion bash)` (or zsh) in your shell's rc file, or "
        "`gpuplane completion fish | source`. Job and host ids complete from the control "
        "plane that GPUPLANE_ADDR/GPUPLANE_API_KEY (or an env file) name.",
    )
    parser.add_argument("shell", choices=SHELLS)
    parser.set_defaults(handler=print_script)


def print_script(args: argparse.Namespace, ctx: Context) -> int:
    from argcomplete.shell_integration import shellcode

    print(shellcode(["gpuplane"], shell=args.shell), end="")
    return EXIT_OK


def autocomplete(parser: argparse.ArgumentParser) -> None:
    """Attaches the id completers, then answers a completion request and exits when the
    shell's script ran us (`_ARGCOMPLETE` set); otherwise returns at once."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    import argcomplete  # only here: other commands never load it

    for leaf in all_parsers(parser):
        for action in leaf._actions:
            completer = _completer_for(action)
            if completer is not None:
                action.completer = completer  # type: ignore[attr-defined]
    argcomplete.autocomplete(parser)


def _completer_for(action: argparse.Action) -> IdCompleter | None:
    if action.dest == "job_id" or "--job" in action.option_strings:
        return IdCompleter(_job_ids)
    if action.dest == "host_id":
        return IdCompleter(_host_ids)
    if action.dest == "session_id":
        return IdCompleter(_session_ids)
    return None


# Lists ids with a one-line description each (zsh and fish show it beside the id).
Lookup = Callable[[Client], Awaitable[dict[str, str]]]


class IdCompleter:
    """An argcomplete completer: the ids that `lookup` lists, with the caller's address, key
    and TLS settings (flags given so far, env files, the environment); nothing on any error."""

    def __init__(self, lookup: Lookup) -> None:
        self.lookup = lookup

    def __call__(self, *, prefix: str, parsed_args: argparse.Namespace, **_: Any) -> dict[str, str]:
        try:
            found = asyncio.run(self._fetch(parsed_args))
        except Exception:  # noqa: BLE001 - a failed lookup offers nothing, never a traceback
            return {}
        return {i: about for i, about in found.items() if i.startswith(prefix)}

    async def _fetch(self, parsed_args: argparse.Namespace) -> dict[str, str]:
        from gpuplane_cli.main import apply_env_files

        environ = dict(os.environ)
        apply_env_files(parsed_args, environ)
        target = dataclasses.replace(Target.from_args(parsed_args, environ), timeout=LOOKUP_TIMEOUT)
        async with Client(target) as client:
            return await self.lookup(client)


async def _job_ids(client: Client) -> dict[str, str]:
    from gpuplane.v1 import jobs_pb2, types_pb2

    request = jobs_pb2.ListJobsRequest(page_size=LOOKUP_PAGE)
    jobs = (await client.call(client.jobs.ListJobs, request)).jobs
    return {j.job_id: f"{enum_name(types_pb2.JobState, j.state)} {j.spec.image}" for j in jobs}


async def _host_ids(client: Client) -> dict[str, str]:
    from gpuplane.v1 import registry_pb2, types_pb2

    request = registry_pb2.ListHostsRequest(page_size=LOOKUP_PAGE)
    hosts = (await client.call(client.registry.ListHosts, request)).hosts
    return {h.host_id: f"{enum_name(types_pb2.HostState, h.state)} {h.hostname}" for h in hosts}


async def _session_ids(client: Client) -> dict[str, str]:
    from gpuplane.v1 import sessions_pb2, types_pb2

    request = sessions_pb2.ListSessionsRequest(page_size=LOOKUP_PAGE)
    found = (await client.call(client.sessions.ListSessions, request)).sessions
    return {s.session_id: f"{enum_name(types_pb2.JobState, s.state)} {s.image}" for s in found}
