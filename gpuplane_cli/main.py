"""The `gpuplane` command: one argparse tree, env files, and errors as messages with exit codes."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sys
from collections.abc import MutableMapping, Sequence

import grpc

from gpuplane_cli import (
    admin,
    apply,
    completion,
    contexts,
    data,
    hints,
    hosts,
    ids,
    jobs,
    ledger,
    natskeys,
    serve,
    services,
    sessions,
    tunnels,
    up,
)
from gpuplane_cli.args import Handler, common_options
from gpuplane_cli.client import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    CliError,
    Context,
    Target,
    describe_rpc_error,
    exit_code_for,
    load_env_file,
)

DESCRIPTION = "gpuplane: a GPU compute marketplace (control plane, provider daemon, ledger)."
EPILOG = """\
Clients read GPUPLANE_ADDR and GPUPLANE_API_KEY (or --addr/--api-key), optionally from an
env file (--env-file FILE or GPUPLANE_ENV_FILE). `gpuplane up` writes one for its stack.
They speak TLS and verify the server (GPUPLANE_CA_FILE/--cacert, default the system's roots;
a client certificate from GPUPLANE_CERT_FILE/--cert and GPUPLANE_KEY_FILE/--key); plaintext
only with GPUPLANE_PLAINTEXT=1 or --plaintext.

{contexts}

exit codes: 0 ok, 1 error, 2 usage or invalid argument, 3 not found, 4 unauthenticated or
permission denied, 5 failed precondition or conflict, 6 resource exhausted, 7 control plane
unavailable, 8 not implemented, 9 the job did not succeed, 130 interrupted"""


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The whole command tree. The daemon's own parser is loaded only for `daemon` commands."""
    parser = hints.Parser(
        prog="gpuplane",
        description=DESCRIPTION,
        epilog=EPILOG.format(contexts=contexts.PRECEDENCE),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common_options(suppress=False)],
    )
    subparsers = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    leaf_common = common_options(suppress=True)
    up.register(subparsers)
    serve.register(subparsers, want_daemon=_first_command(argv) == "daemon")
    jobs.register(subparsers, leaf_common)
    sessions.register(subparsers, leaf_common)
    services.register(subparsers, leaf_common)
    apply.register(subparsers, leaf_common)
    data.register(subparsers, leaf_common)
    hosts.register(subparsers, leaf_common)
    ledger.register(subparsers, leaf_common)
    admin.register(subparsers, leaf_common)
    natskeys.register(subparsers, leaf_common)
    tunnels.register(subparsers, leaf_common)
    contexts.register(subparsers)
    completion.register(subparsers)
    return parser


def _first_command(argv: Sequence[str]) -> str | None:
    """The first word that is not an option or an option's value (good enough for routing)."""
    takes_value = {"--addr", "--api-key", "--context", "--env-file", "--timeout"}
    takes_value |= {"--cacert", "--cert", "--key"}
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in takes_value:
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits at the first `--`: options before it, a job's command after it."""
    words = list(argv)
    if "--" in words:
        at = words.index("--")
        return words[:at], words[at + 1 :]
    return words, []


def apply_env_files(args: argparse.Namespace, environ: MutableMapping[str, str]) -> None:
    """GPUPLANE_ENV_FILE fills in what the environment lacks; --env-file overrides it."""
    from_env = environ.get("GPUPLANE_ENV_FILE")
    if from_env:
        load_env_file(from_env, environ, override=False)
    if getattr(args, "env_file", None):
        load_env_file(args.env_file, environ, override=True)


def main(argv: Sequence[str] | None = None, environ: MutableMapping[str, str] | None = None) -> int:
    """Runs one command; returns its exit code. `environ` defaults to os.environ (env files
    are loaded into it, so that settings read from the environment see them too)."""
    words, command = split_command(sys.argv[1:] if argv is None else argv)
    parser = build_parser(words)
    completion.autocomplete(parser)  # under a shell's completion script: answers and exits
    args = hints.parse(parser, words, command, takes_command=jobs.submit_job)
    if command:
        if not hasattr(args, "image") and args.handler is not tunnels.exec_command:
            parser.error(
                "`-- COMMAND` is only accepted by `gpuplane jobs submit`, `services deploy` "
                "and `exec`"
            )
        args.job_command = command
    ctx = Context(args=args, environ=os.environ if environ is None else environ)
    try:
        apply_env_files(args, ctx.environ)
        handler = args.handler
        if inspect.iscoroutinefunction(handler):
            return int(asyncio.run(_run_async(handler, args, ctx)))
        return int(handler(args, ctx))
    except CliError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.code
    except grpc.RpcError as exc:
        addr = Target.from_args(args, ctx.environ).addr
        print(f"error: {describe_rpc_error(exc, addr, args)}", file=sys.stderr)
        return exit_code_for(exc.code())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `gpuplane jobs list | head`: the reader left; say nothing more.
        sys.stderr.close()
        return EXIT_OK


async def _run_async(handler: Handler, args: argparse.Namespace, ctx: Context) -> int:
    try:
        await ids.resolve_args(args, ctx)
        return await handler(args, ctx)
    finally:
        await ctx.close()


if __name__ == "__main__":
    sys.exit(main())
