"""Tiny local images for tests: a stand-in bundle built from the host's static busybox, no registry needed."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import docker

READY_IMAGE = "bottle-test-bundle:ready"  # answers HTTP on 8888, as a bundle must
MUTE_IMAGE = "bottle-test-bundle:mute"  # runs, but never listens: a bundle that never gets ready
_COMMANDS = {
    READY_IMAGE: ["/bin/busybox", "httpd", "-f", "-p", "8888", "-h", "/www"],
    MUTE_IMAGE: ["/bin/busybox", "sleep", "3600"],
}


def _exists(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def _tool(name: str, package: str, purpose: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"building {purpose} needs {name} on PATH: apt-get install {package}")
    return path


def build_test_bundle(client: docker.DockerClient, tag: str = READY_IMAGE) -> str:
    """Build one of the stand-in bundle images unless it exists (cached by tag); return its tag.

    Needs a static busybox on PATH (Debian: `apt-get install busybox-static`).
    """
    if _exists(client, tag):
        return tag
    busybox = _tool("busybox", "busybox-static", "the test bundle image")
    with tempfile.TemporaryDirectory() as context:
        shutil.copy(busybox, Path(context) / "busybox")
        (Path(context) / "Dockerfile").write_text(
            "FROM scratch\n"
            "COPY busybox /bin/busybox\n"
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
            'RUN ["/bin/busybox", "mkdir", "-p", "/www"]\n'
            f"CMD {json.dumps(_COMMANDS[tag])}\n"
        )
        client.images.build(path=context, tag=tag, labels={"bottle.test": "image"}, rm=True)
    return tag


PYTHON_BASE = "bottle-test-python:bookworm"  # Debian bookworm, minbase, with python3 and venv


def build_python_base(client: docker.DockerClient, tag: str = PYTHON_BASE) -> str:
    """A Debian base image with Python, made with debootstrap (no registry); cached by tag.

    Needs root and debootstrap (Debian: `apt-get install debootstrap`); takes about a minute.
    """
    if _exists(client, tag):
        return tag
    debootstrap = _tool("debootstrap", "debootstrap", "the test Python base")
    with tempfile.TemporaryDirectory(prefix="bottle-rootfs-") as tmp:
        rootfs, tarball = Path(tmp) / "rootfs", Path(tmp) / "rootfs.tar"
        subprocess.run(
            [debootstrap, "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm", rootfs],
            check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(["tar", "-C", rootfs, "-cf", tarball, "."], check=True)
        repository, _, version = tag.partition(":")
        client.api.import_image_from_file(str(tarball), repository=repository, tag=version or "latest")
    return tag
