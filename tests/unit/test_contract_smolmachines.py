import pytest

from bottle.backends.smolmachines import SmolmachinesBackend
from bottle.manifest import parse_manifest
from bottle.testing.contract import BackendContract


class TestSmolmachinesContract(BackendContract):
    @pytest.fixture
    def backend(self):
        return SmolmachinesBackend(routes=[])

    @pytest.fixture
    def manifest(self):
        return parse_manifest({"name": "contract", "agent": {"image": "debian:bookworm", "env": {"A": "1"}}})
