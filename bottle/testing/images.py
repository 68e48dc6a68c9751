"""Tiny local images for tests: a stand-in bundle built from the host's static busybox, no registry needed."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import docker

READY_IMAGE = "bottle-test-bundle:ready"  # answers HTTP on 8888, as a bundle must
MUTE_IMAGE = "bottle-test-bundle:mute"  # runs, but never listens: a bundle that never gets ready
_COMMANDS = {
    READY_IMAGE: ["/bin/busybox", "httpd", "-f", "-p", "8888", "-h", "/www"],
    MUTE_IMAGE: ["/bin/busybox", "sleep", "3600"],
}


def build_test_bundle(client: docker.DockerClient, tag: str = READY_IMAGE) -> str:
    """Build one of the stand-in bundle images unless it exists (cached by tag); return its tag.

    Needs a static busybox on PATH (Debian: `apt-get install busybox-static`).
    """
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("building the test bundle image needs a static busybox: apt-get install busybox-static")
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
