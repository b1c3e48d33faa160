"""A busybox image with dropbear (an SSH server), for tests of SSH through port-forward --stdio."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import docker
from docker.errors import ImageNotFound

from devstack.images import find_static_busybox, rootfs_tar
from devstack.process import DevstackError

SSHD_TEST_IMAGE = "gpuplane-test/sshd:2"
# Root's (and nobody's) home is under /tmp: the job's root filesystem is read-only.
HOME = "/tmp/home"
PASSWD = f"root:x:0:0:root:{HOME}:/bin/sh\nnobody:x:65534:65534:nobody:{HOME}:/bin/sh\n"


def _binary(name: str) -> Path:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        raise DevstackError(
            f"could not build the SSH test image: no {name} (apt-get install dropbear-bin)"
        )
    return Path(found)


def _libraries(binary: Path) -> list[Path]:
    """The shared libraries `binary` loads, the dynamic loader included (from ldd)."""
    listed = subprocess.run(
        ["ldd", str(binary)], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    return [Path(p) for p in re.findall(r"(/\S+\.so[.\d]*)", listed)]


def build_sshd_image(client: docker.DockerClient, tag: str = SSHD_TEST_IMAGE) -> str:
    """Imports the busybox test image plus dropbear and dropbearkey (with the libraries they
    load, as the host has them), running as nobody, as `tag` unless it exists; returns its
    image id."""
    try:
        return str(client.images.get(tag).id)
    except ImageNotFound:
        pass
    binaries = [_binary("dropbear"), _binary("dropbearkey")]
    extra: dict[str, bytes] = {f"bin/{b.name}": b.read_bytes() for b in binaries}
    for library in {lib for b in binaries for lib in _libraries(b)}:
        extra[str(library).lstrip("/")] = library.resolve().read_bytes()
    extra["etc/passwd"] = PASSWD.encode()
    data = rootfs_tar(find_static_busybox(), extra)
    repository, _, version = tag.rpartition(":")
    client.api.import_image_from_data(
        data,
        repository=repository,
        tag=version,
        # Not root: a job's container has no capabilities, and dropbear running as root
        # would change groups (setgroups) at each login; as nobody it logs in only nobody.
        changes=["ENV PATH=/bin:/usr/bin:/sbin", "WORKDIR /", 'CMD ["sh"]', "USER 65534:65534"],
    )
    return str(client.images.get(tag).id)


def sshd_script(public_key: str, port: int) -> str:
    """A shell command that starts dropbear on 127.0.0.1:port accepting `public_key`."""
    return (
        f"mkdir -p {HOME}/.ssh && chmod 700 {HOME} {HOME}/.ssh && "
        f"echo '{public_key.strip()}' > {HOME}/.ssh/authorized_keys && "
        "dropbearkey -t ed25519 -f /tmp/hostkey >/dev/null 2>&1 && "
        f"(dropbear -F -E -s -P /tmp/dropbear.pid -r /tmp/hostkey -p 127.0.0.1:{port} "
        ">/tmp/dropbear.log 2>&1 &)"
    )
