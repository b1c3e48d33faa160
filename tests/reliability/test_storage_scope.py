"""A hostile provider against object storage: holding only what its dispatch grants (no key of
its own), it tries to read another tenant's input, list the bucket, and write, overwrite or
delete outside its attempt's prefix. The S3 server itself refuses every try."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import urllib3
from gpuplane.v1 import messaging_pb2, types_pb2

from controlplane.scheduler.service import DISPATCH_GRACE
from devstack import S3Server
from devstack.factories import CREDIT, new_tenant
from storage import layout
from storage.grants import UPLOAD_WINDOW
from storage.objects import StorageError
from storage.scoped import GrantedStore
from tests.controlplane.scripted_host import scripted_host
from tests.harness import JobPlane
from tests.reliability import summary

pytestmark = [pytest.mark.timeout(60), pytest.mark.plane(heartbeat_timeout_ms=60_000)]
BUCKET = "gpuplane"
_CODE = re.compile(r"<Code>([^<]*)</Code>")


class Hostile:
    """A provider's daemon that holds one dispatch's grant and tries everything else with it."""

    def __init__(self, s3: S3Server, grant: messaging_pb2.StorageGrant) -> None:
        self.grant = grant
        self.base = f"{s3.url}/{BUCKET}"
        self.http = urllib3.PoolManager(retries=False)
        self.tried = 0

    def refused(self, method: str, url: str, **kw: object) -> str:
        """Sends one request; asserts the S3 server refused it (403, or 400 for a key it will
        not take) and returns its error code."""
        self.tried += 1
        response = self.http.request(method, url, **kw)  # type: ignore[arg-type]
        body = response.data.decode(errors="replace")
        assert response.status in (400, 403), f"{method} {url}: {response.status} {body[:300]}"
        found = _CODE.search(body)
        return found.group(1) if found else ""

    def post(self, key: str, data: bytes) -> str:
        fields: dict[str, object] = {**self.grant.upload_fields, "key": key}
        fields["Content-Type"] = "application/octet-stream"
        fields["file"] = ("object", data)
        return self.refused("POST", self.grant.upload_url, fields=fields)


def retarget(url: str, key: str) -> str:
    """The same presigned URL (signature, credential, expiry) naming another key."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{BUCKET}/{key}"))


async def test_a_daemon_cannot_leave_its_attempt_in_the_bucket(
    plane: JobPlane, s3_server: S3Server, tmp_path: Path
) -> None:
    admin = s3_server.client()
    victim, _ = await new_tenant(plane, "victim", types_pb2.ROLE_CONSUMER)
    own_input = layout.input_key(plane.consumer_tenant, "weights.bin")
    secret = layout.input_key(victim, "secret.bin")
    earlier = layout.output_key("job-of-the-victim", 1, "result.bin")
    for key, data in ((own_input, b"my weights"), (secret, b"secret"), (earlier, b"result")):
        admin.put_object(BUCKET, key, io.BytesIO(data), len(data))
    host = await scripted_host(plane, price=2 * CREDIT, gpus=1)
    try:
        job = await plane.submit(
            gpu_count=1,
            max_duration_seconds=600,
            inputs=[types_pb2.JobInput(key="weights.bin")],
        )
        dispatch = await host.next_dispatch()
        assert dispatch.job_id == job.job_id
        grant = dispatch.storage
        prefix = dispatch.results_prefix
        assert set(grant.input_urls) == {own_input}

        # What it is granted works, through the daemon's own client.
        store = GrantedStore(grant, urllib3.PoolManager(retries=False))
        fetched = await store.download_file(own_input, tmp_path / "weights.bin")
        assert fetched.sha256 == hashlib.sha256(b"my weights").hexdigest()
        stored = await store.put_bytes(f"{prefix}output/out.txt", b"out")
        assert admin.get_object(BUCKET, stored.key).read() == b"out"
        with pytest.raises(StorageError, match="does not cover it"):
            await store.download_file(secret, tmp_path / "secret.bin")

        # It expires with the attempt: its deadline (dispatch grace + max duration) plus the
        # upload window, within the seconds this test took.
        lasts = grant.expires_at.ToDatetime() - dispatch.deadline.ToDatetime()
        assert lasts == UPLOAD_WINDOW
        assert dispatch.deadline.ToDatetime() - job.created_at.ToDatetime() < (
            DISPATCH_GRACE + timedelta(seconds=600 + 30)
        )

        hostile = Hostile(s3_server, grant)
        url = grant.input_urls[own_input]
        codes = await asyncio.to_thread(attacks, hostile, url, prefix, secret, earlier)
        assert set(codes) <= {"AccessDenied", "SignatureDoesNotMatch", "InvalidRequest"}, codes
        # Nothing it tried changed anything.
        assert admin.get_object(BUCKET, secret).read() == b"secret"
        assert admin.get_object(BUCKET, earlier).read() == b"result"
        assert admin.get_object(BUCKET, own_input).read() == b"my weights"
        summary.record(
            "daemon reads another tenant's input, lists, writes outside its attempt prefix",
            f"{hostile.tried} requests with one dispatch's grant, all refused by the S3 server",
            requests_tried=hostile.tried,
        )
    finally:
        await host.close()


def attacks(hostile: Hostile, url: str, prefix: str, secret: str, earlier: str) -> list[str]:
    """Every way out of the grant a daemon could try; each is refused (403), codes returned."""
    base = hostile.base
    return [
        # Read another tenant's input: with no signature, and with its own input's signature.
        hostile.refused("GET", f"{base}/{secret}"),
        hostile.refused("GET", retarget(url, secret)),
        hostile.refused("GET", retarget(url, earlier)),
        # List the bucket, or its own tenant's inputs.
        hostile.refused("GET", f"{base}?list-type=2"),
        hostile.refused("GET", f"{base}?list-type=2&prefix=inputs/"),
        hostile.refused("GET", retarget(url, "") + "&list-type=2"),
        # Write outside its prefix: another job's results, another tenant's input, its own
        # input, the bucket's root; with the POST policy and with plain PUTs.
        hostile.post(earlier, b"forged"),
        hostile.post(secret, b"forged"),
        hostile.post(layout.input_key("t", "planted.bin"), b"forged"),
        hostile.post("planted.bin", b"forged"),
        hostile.post(prefix.rstrip("/") + "-other/output/x", b"forged"),
        # Climb out from inside the prefix (the policy's condition is on the literal key).
        hostile.post(f"{prefix}../../{earlier.split('/')[1]}/1/output/result.bin", b"forged"),
        hostile.refused("PUT", f"{base}/{prefix}output/unsigned", body=b"forged"),
        hostile.refused("PUT", url, body=b"forged"),
        hostile.refused("PUT", retarget(url, earlier), body=b"forged"),
        # Delete: another job's results, or its own input.
        hostile.refused("DELETE", f"{base}/{earlier}"),
        hostile.refused("DELETE", url),
    ]
