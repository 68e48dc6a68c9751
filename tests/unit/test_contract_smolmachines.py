import os

import pytest

from bottle.backends.smolmachines import SmolmachinesBackend
from bottle.backends.smolmachines import launch
from bottle.manifest import parse_manifest
from bottle.testing import fake_smolvm
from bottle.testing.contract import BackendContract


class TestSmolmachinesContract(BackendContract):
    @pytest.fixture
    def backend(self):
        return SmolmachinesBackend(routes=[])

    @pytest.fixture
    def manifest(self):
        return parse_manifest({"name": "contract", "agent": {"image": "debian:bookworm", "env": {"A": "1"}}})

    @pytest.fixture
    def launchable(self, docker, manifest, tmp_path, monkeypatch):
        """The bundle image, a fake smolvm on PATH, and a bundle that "answers" once its container runs."""
        docker.engine.add_image(manifest.bundle.image)
        fake_smolvm.install(tmp_path / "bin", tmp_path / "smolvm")
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

        def accepts(ip, port):
            return any(
                c["State"]["Running"] and ep["IPAddress"] == ip
                for c in docker.engine.containers.values()
                for ep in c["NetworkSettings"]["Networks"].values()
            )

        monkeypatch.setattr(launch, "_tcp_accepts", accepts)
