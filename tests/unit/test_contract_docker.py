import pytest

from bottle.backends.docker import DockerBackend
from bottle.manifest import parse_manifest
from bottle.testing.contract import BackendContract, bundle_answers_when_running


class TestDockerContract(BackendContract):
    @pytest.fixture
    def backend(self):
        return DockerBackend(routes=[])

    @pytest.fixture
    def manifest(self):
        return parse_manifest(
            {"name": "contract", "backend": "docker", "agent": {"image": "agent:1", "env": {"A": "1"}}}
        )

    @pytest.fixture
    def launchable(self, docker, manifest, monkeypatch):
        docker.engine.add_image(manifest.bundle.image)
        docker.engine.add_image(manifest.agent.image)
        bundle_answers_when_running(monkeypatch, docker)
