import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from bottle.backend import LABEL_SLUG
from bottle.backends.smolmachines.smolvm import Smolvm, wheel_engine
from bottle.state import StateStore
from bottle.testing import fake_smolvm
from bottle.bundle.build import build
from bottle.testing.images import MUTE_IMAGE, READY_IMAGE, build_python_base, build_test_bundle

TEST_LABEL = "bottle.test"  # on every resource a test makes itself, so a leak is findable
BUNDLE_IMAGE = "bottle-test-bundle:real"


@pytest.fixture(scope="session")
def engine() -> docker.DockerClient:
    """The machine's real Docker Engine; its absence fails the run instead of skipping it."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"integration tests need a running Docker Engine: {exc}")
    return client


@pytest.fixture(scope="session")
def bundle_images(engine) -> None:
    try:
        build_test_bundle(engine, READY_IMAGE)
        build_test_bundle(engine, MUTE_IMAGE)
    except RuntimeError as exc:
        pytest.fail(str(exc))


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


@pytest.fixture(scope="session")
def python_base(engine) -> str:
    """A Debian image with Python, made with debootstrap (cached by tag)."""
    try:
        return build_python_base(engine)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"cannot build the Python base image: {exc}")


@pytest.fixture(scope="session")
def bundle_image(engine, python_base) -> str:
    """The bundle image built from this checkout (docker's layer cache keeps rebuilds quick)."""
    build(engine, base=python_base, tag=BUNDLE_IMAGE)
    return BUNDLE_IMAGE


@pytest.fixture(scope="session")
def real_smolvm(tmp_path_factory) -> Smolvm:
    """The real smolvm of the smolmachines wheel (a test dependency); each user gives it a state dir."""
    found = wheel_engine(StateStore(tmp_path_factory.mktemp("engine-home")))
    if found is None:
        pytest.fail("the smolmachines wheel is not installed: pip install -e '.[test]'")
    return found


@pytest.fixture
def smolvm_state(tmp_path, monkeypatch, engine, bundle_images, real_smolvm) -> Iterator[Path]:
    """The fake smolvm (the real binary, with the boot simulated by a confined stand-in container) as
    the smolvm bottle drives; returns the fake's state directory."""
    state = tmp_path / "smolvm-state"
    monkeypatch.setenv("BOTTLE_SMOLVM", str(fake_smolvm.install(tmp_path / "bin", state, real_smolvm, READY_IMAGE)))
    yield state
    fake_smolvm.cleanup(state)


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


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("BOTTLE_HOME", str(path))
    return path


@pytest.fixture
def write_manifest(tmp_path, slug, bundle_images):
    def write(name: str = slug, bundle_image: str = READY_IMAGE) -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(
            f'name = "{name}"\n[agent]\nimage = "{READY_IMAGE}"\ncommand = ["sh"]\nenv = {{ TERM = "xterm" }}\n'
            f'[egress]\nallow = ["api.anthropic.com"]\n[bundle]\nimage = "{bundle_image}"\n'
        )
        return path

    return write


def leftovers(engine, slug: str, smolvm_state: Path, home: Path) -> dict:
    """Everything of a bottle that still exists anywhere, empty when it is fully gone."""
    label = {"label": f"{LABEL_SLUG}={slug}"}
    found = {
        "networks": [n.name for n in engine.networks.list(filters=label)],
        "containers": [c.name for c in engine.containers.list(all=True, filters=label)],
        "machines": [m for m in fake_smolvm.machines(smolvm_state) if m == f"bottle-{slug}"],
        "state": (home / "bottles" / slug).exists(),
        "partial archives": [p.name for p in (home / "cache" / "images").glob(".saving-*")],
    }
    return {k: v for k, v in found.items() if v}


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory):
    """A real kube-apiserver (v1.20.2, built from Debian's source; cached) with etcd, on loopback.

    Building it needs Debian's repositories the first time (about 7 minutes); a failure fails the
    tests that need it, with the build's last lines.
    """
    from bottle.testing import kube_apiserver

    try:
        binary = kube_apiserver.build(Path(__file__).parents[1] / "support" / "kube-apiserver.sh")
        server = kube_apiserver.start(binary, tmp_path_factory.mktemp("apiserver"))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()


@pytest.fixture
def kube(apiserver, monkeypatch):
    """KUBECONFIG pointing at the test API server (context `bottle-test`, all rights), and a client for it."""
    import kubernetes

    monkeypatch.setenv("KUBECONFIG", str(apiserver.kubeconfig))
    return kubernetes.config.new_client_from_config(config_file=str(apiserver.kubeconfig), persist_config=False)
