import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import docker
import pytest

from bottle.backend import LABEL_SLUG
from bottle.testing import fake_smolvm

TEST_LABEL = "bottle.test"  # on every resource a test makes itself, so a leak is findable
READY_IMAGE = "bottle-test-bundle:ready"  # answers HTTP on 8888, as a bundle must
MUTE_IMAGE = "bottle-test-bundle:mute"  # runs, but never listens: a bundle that never gets ready


@pytest.fixture(scope="session")
def engine() -> docker.DockerClient:
    """The machine's real Docker Engine; its absence fails the run instead of skipping it."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"integration tests need a running Docker Engine: {exc}")
    return client


def _build_busybox_image(client: docker.DockerClient, tag: str, cmd: list[str]) -> None:
    """Build a tiny image from the host's static busybox (no registry needed); cached by tag."""
    try:
        client.images.get(tag)
        return
    except docker.errors.ImageNotFound:
        pass
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.fail("integration tests need a static busybox on PATH: apt-get install busybox-static")
    with tempfile.TemporaryDirectory() as context:
        shutil.copy(busybox, Path(context) / "busybox")
        (Path(context) / "Dockerfile").write_text(
            "FROM scratch\nCOPY busybox /bin/busybox\n"
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]\nRUN ["/bin/busybox", "mkdir", "-p", "/www"]\n'
            f"CMD {cmd!r}\n".replace("'", '"')
        )
        client.images.build(path=context, tag=tag, labels={TEST_LABEL: "image"}, rm=True)


@pytest.fixture(scope="session")
def bundle_images(engine) -> None:
    _build_busybox_image(engine, READY_IMAGE, ["/bin/busybox", "httpd", "-f", "-p", "8888", "-h", "/www"])
    _build_busybox_image(engine, MUTE_IMAGE, ["/bin/busybox", "sleep", "3600"])


def _sweep(client: docker.DockerClient, label: str) -> None:
    for container in client.containers.list(all=True, filters={"label": label}):
        container.remove(force=True)
    for network in client.networks.list(filters={"label": label}):
        network.remove()


@pytest.fixture
def slug(engine):
    """A unique bottle slug; everything labelled with it (or by this test) is removed afterwards."""
    value = f"it-{uuid.uuid4().hex[:10]}"
    yield value
    _sweep(engine, f"{LABEL_SLUG}={value}")
    _sweep(engine, f"{TEST_LABEL}={value}")


@pytest.fixture
def smolvm_state(tmp_path, monkeypatch) -> Path:
    """A fake smolvm 0.8.0 first on PATH; returns its state directory."""
    state = tmp_path / "smolvm-state"
    fake_smolvm.install(tmp_path / "bin", state)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return state


def bottle(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real `bottle` command in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "bottle", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )
