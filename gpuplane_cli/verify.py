"""`gpuplane jobs verify JOB`: a downloaded result set checked offline against its provenance."""

from __future__ import annotations

import argparse
import binascii
import json
from pathlib import Path

from gpuplane_cli import args as a
from gpuplane_cli.client import EXIT_OK, EXIT_USAGE, CliError, Context
from messaging.provenance import FILE_NAME, VerifyFailed, verify_results
from messaging.signing import unb64

# `jobs verify` exits with this when a check fails (the message names the first that did).
EXIT_VERIFY_FAILED = 10


def register(jobs: a.Subparsers, common: argparse.ArgumentParser) -> None:
    verify = a.add_leaf(jobs, "verify", verify_job, "check a downloaded result set offline", common)
    verify.add_argument("job_id")
    verify.add_argument(
        "--dir",
        metavar="DIR",
        help=f"where `jobs results JOB --download DIR` put it (with {FILE_NAME}); default JOB",
    )
    verify.add_argument(
        "--control-plane-key",
        metavar="BASE64",
        help="require this control-plane public key (control_plane_public_key of "
        "`jobs results JOB --json`) rather than trust the one in the document",
    )


def save_provenance(root: Path, provenance: str) -> None:
    """Writes the attempt's provenance document beside its downloaded outputs."""
    if provenance:
        (root / FILE_NAME).write_text(provenance)


def verify_job(args: argparse.Namespace, ctx: Context) -> int:
    root = Path(args.dir or args.job_id)
    pinned = None
    if args.control_plane_key:
        try:
            pinned = unb64(args.control_plane_key)
        except (ValueError, binascii.Error):
            raise CliError("--control-plane-key: not base64", EXIT_USAGE) from None
    try:
        verified = verify_results(root, pinned)
        if verified.job_id != args.job_id:
            raise VerifyFailed(f"job_id: the provenance is of job {verified.job_id}")
    except VerifyFailed as failed:
        raise CliError(f"verify failed: {failed}", EXIT_VERIFY_FAILED) from None
    if ctx.json:
        print(
            json.dumps(
                {
                    "job_id": verified.job_id,
                    "attempt": verified.attempt,
                    "outputs": verified.outputs,
                    "billed_run_time_ms": verified.billed_run_time_ms,
                    "verified": True,
                }
            )
        )
    else:
        print(
            f"job {verified.job_id} attempt {verified.attempt}: both signatures, "
            f"{verified.outputs} outputs and billed time {verified.billed_run_time_ms} ms verified"
        )
    return EXIT_OK
