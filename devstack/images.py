"""A tiny busybox image built locally (no registry): a static busybox imported as a rootfs."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import docker
from docker.errors import ImageNotFound

from devstack.process import DevstackError

TEST_IMAGE = "gpuplane-test/busybox:1"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox", "/usr/local/bin/busybox")
# Applets linked even if `busybox --list` fails; the list normally adds ~270 more.
_BASIC_APPLETS = ("sh", "echo", "cat", "sleep", "ls", "env", "true", "false", "id", "sha256sum")
_PT_INTERP = 3


def is_static_elf(path: Path) -> bool:
    """True for a 64-bit little-endian ELF executable without a program interpreter."""
    with path.open("rb") as handle:
        header = handle.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            return False
        (phoff,) = struct.unpack_from("<Q", header, 32)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        handle.seek(phoff)
        table = handle.read(phentsize * phnum)
    types = [struct.unpack_from("<I", table, i * phentsize)[0] for i in range(phnum)]
    return _PT_INTERP not in types


def find_static_busybox() -> Path:
    """A statically linked busybox on this machine (Debian: package busybox-static)."""
    candidates = [Path(p) for p in BUSYBOX_CANDIDATES]
    found = shutil.which("busybox")
    if found is not None:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and is_static_elf(candidate):
            return candidate
    raise DevstackError(
        "could not build the test image: no statically linked busybox found at "
        f"{', '.join(BUSYBOX_CANDIDATES)} (Debian: apt-get install busybox-static; "
        "scripts/bootstrap does)"
    )


def _applets(busybox: Path) -> list[str]:
    try:
        listed = subprocess.run(
            [str(busybox), "--list"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        listed = []
    return sorted({*_BASIC_APPLETS, *listed} - {"busybox"})


def rootfs_tar(busybox: Path, extra: dict[str, bytes] | None = None) -> bytes:
    """A tar of a minimal root filesystem around `busybox`, with `extra` executables (path
    in the image: content; an `etc/passwd` among them replaces the default one)."""
    extra = dict(extra or {})
    now = int(time.time())
    buffer = io.BytesIO()

    def add(name: str, kind: bytes, mode: int, data: bytes = b"", target: str = "") -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime, info.linkname = kind, mode, now, target
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data) if data else None)

    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("bin", "etc", "dev", "proc", "sys", "root", "input", "output", "usr"):
            add(directory, tarfile.DIRTYPE, 0o755)
        add("tmp", tarfile.DIRTYPE, 0o1777)
        add("bin/busybox", tarfile.REGTYPE, 0o755, busybox.read_bytes())
        for applet in _applets(busybox):
            add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, target="busybox")
        add("sbin", tarfile.SYMTYPE, 0o777, target="bin")
        add("usr/bin", tarfile.SYMTYPE, 0o777, target="../bin")
        add("usr/sbin", tarfile.SYMTYPE, 0o777, target="../bin")
        passwd = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
        add("etc/passwd", tarfile.REGTYPE, 0o644, extra.pop("etc/passwd", passwd))
        add("etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\nnogroup:x:65534:\n")
        for name, data in extra.items():
            add(name, tarfile.REGTYPE, 0o755, data)
    return buffer.getvalue()


def build_test_image(client: docker.DockerClient, tag: str = TEST_IMAGE) -> str:
    """Imports the busybox test image as `tag` unless it exists; returns its image id.

    It has sh, echo, cat, sleep, ls, env, sha256sum and the rest of busybox in /bin,
    empty /input and /output, PATH set and `sh` as its command.
    """
    try:
        return str(client.images.get(tag).id)
    except ImageNotFound:
        pass
    repository, _, version = tag.rpartition(":")
    if not repository or "/" in version:
        repository, version = tag, "latest"
    data = rootfs_tar(find_static_busybox())
    client.api.import_image_from_data(
        data,
        repository=repository,
        tag=version,
        changes=[
            "ENV PATH=/bin:/usr/bin:/sbin",
            "WORKDIR /",
            'CMD ["sh"]',
            "LABEL gpuplane.test-image=busybox",
        ],
    )
    return str(client.images.get(tag).id)


PROBE_TEST_IMAGE = "gpuplane-test/probe:1"
PROBE_SOURCE = Path(__file__).resolve().parents[1] / "deploy" / "probe" / "probe.c"


def build_probe_image(client: docker.DockerClient, tag: str = PROBE_TEST_IMAGE) -> str:
    """Imports the verification probe's test image as `tag` unless it exists: the busybox
    image plus /probe, deploy/probe/probe.c compiled statically (the CPU reference of the
    probe; production runs deploy/probe/probe.py on the GPUs). Returns its image id."""
    try:
        return str(client.images.get(tag).id)
    except ImageNotFound:
        pass
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("could not build the probe image: no C compiler (apt-get install gcc)")
    with tempfile.TemporaryDirectory() as temporary:
        binary = Path(temporary) / "probe"
        subprocess.run(
            [compiler, "-O2", "-static", "-o", str(binary), str(PROBE_SOURCE)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        data = rootfs_tar(find_static_busybox(), {"probe": binary.read_bytes()})
    repository, _, version = tag.rpartition(":")
    client.api.import_image_from_data(
        data,
        repository=repository,
        tag=version,
        changes=["ENV PATH=/bin", "WORKDIR /", 'CMD ["/probe"]', "LABEL gpuplane.test-image=probe"],
    )
    return str(client.images.get(tag).id)
