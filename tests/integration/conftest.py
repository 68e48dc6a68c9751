import uuid

import docker
import pytest

from bottle.backend import LABEL_SLUG

TEST_LABEL = "bottle.test"  # on every resource a test makes itself, so a leak is findable


@pytest.fixture(scope="session")
def engine() -> docker.DockerClient:
    """The machine's real Docker Engine; its absence fails the run instead of skipping it."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"integration tests need a running Docker Engine: {exc}")
    return client


@pytest.fixture
def slug(engine):
    """A unique bottle slug; every network labelled with it (or by this test) is removed afterwards."""
    value = f"it-{uuid.uuid4().hex[:10]}"
    yield value
    for network in engine.networks.list(filters={"label": [f"{LABEL_SLUG}={value}"]}) + engine.networks.list(
        filters={"label": [f"{TEST_LABEL}={value}"]}
    ):
        network.remove()
