"""`gpuplane apply FILE`: submits the job a job file describes, as `jobs submit` would."""

from __future__ import annotations

import argparse
import ast
import re

import grpc
import yaml

from gpuplane_cli import args as a
from gpuplane_cli import jobfile, jobs
from gpuplane_cli.client import EXIT_USAGE, CliError, Context
from gpuplane_cli.jobfile import Error, JobFile, JobFileError

# The control plane names the first bad field: "spec.inputs[0].key: ...", "spec.env['A']: ...".
_SERVER_FIELD = re.compile(r"^spec\.(\w+)(?:\[([^\]]+)\])?(?:\.\w+)?: (.*)$", re.DOTALL)

EPILOG = """\
A job file is YAML whose fields are `jobs submit`'s options, with the flags' units:

  image: pytorch/pytorch:2.4.0      # required
  command: python train.py --epochs 3
  gpus: 2
  gpu_models: [H100, A100-80GB]
  memory: 16g
  max_duration: 2h
  max_price: 2.5                    # credits per GPU-hour, read as written: exact
  budget: 10
  inputs: [sets/train.bin, ./local.bin:in/x.bin]
  env: {EPOCHS: 3}
  max_retries: 2
  retry_on_exit_codes: [75]

Other fields: entrypoint, min_vram, min_compute_capability, cpus, shm_size, labels, network,
host_labels, locations, min_reliability, priority, placement, allow_simulated,
allow_unverified. Local inputs are found relative to the file's folder. Every mistake is
reported as FILE:LINE: FIELD: message, and nothing is submitted."""


def register(subparsers: a.Subparsers, common: argparse.ArgumentParser) -> None:
    parser = a.add_leaf(
        subparsers,
        "apply",
        apply_job,
        "submit the job a YAML job file describes",
        common,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", metavar="FILE", help="the job file (YAML)")
    parser.add_argument("--dry-run", action="store_true", help="quote only: create nothing")
    parser.add_argument("--wait", action="store_true", help="follow the job until it ends")
    parser.add_argument("--idempotency-key", default="")


def submit_args(job: JobFile, args: argparse.Namespace) -> argparse.Namespace:
    """The arguments `jobs submit` would parse from the flags equivalent to `job`."""
    merged = jobfile.apply_to(job, jobs.submit_defaults())
    merged.dry_run = args.dry_run
    merged.wait = args.wait
    merged.idempotency_key = args.idempotency_key
    return merged


async def apply_job(args: argparse.Namespace, ctx: Context) -> int:
    try:
        job = jobfile.load(args.file)
    except JobFileError as exc:
        raise CliError(_lines(exc.errors), EXIT_USAGE) from None
    try:
        return await jobs.submit_job(submit_args(job, args), ctx)
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
            mapped = server_error(job, exc.details() or "")
            if mapped is not None:
                raise CliError(str(mapped), EXIT_USAGE) from None
        raise


def _lines(errors: list[Error]) -> str:
    """Each error on its own `error: ` line (main prints the first prefix)."""
    return "\nerror: ".join(map(str, errors))


def server_error(job: JobFile, details: str) -> Error | None:
    """The control plane's INVALID_ARGUMENT for a spec field, at that field in the file:
    the list item or mapping key it names where the file has one."""
    match = _SERVER_FIELD.match(details)
    if match is None:
        return None
    proto, index, problem = match.groups()
    name = next((n for n, f in jobfile.FIELDS.items() if f.proto == proto), None)
    if name is None:
        return None
    return job.error(name, problem, _part(job.values.get(name), index))


def _part(node: yaml.Node | None, index: str | None) -> yaml.Node | None:
    """The item (`0`) or key (`'A'`) of a field's value that the server's error names."""
    if node is None or index is None:
        return None
    try:
        wanted = ast.literal_eval(index)
    except (ValueError, SyntaxError):
        return None
    if isinstance(node, yaml.SequenceNode):
        if isinstance(wanted, int) and 0 <= wanted < len(node.value):
            item: yaml.Node = node.value[wanted]
            return item
        for item in node.value:
            if isinstance(item, yaml.ScalarNode) and str(item.value).startswith(f"{wanted}="):
                return item
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == wanted:
                return key_node
    return None
