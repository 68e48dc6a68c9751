import pytest

from bottle.backends.smolmachines import SmolmachinesBackend
from bottle.backends.smolmachines import launch
from bottle.manifest import parse_manifest
from bottle.backends.smolmachines.smolvm import Smolvm
from bottle.testing.contract import BackendContract, bundle_answers_when_running


class TestSmolmachinesContract(BackendContract):
    @pytest.fixture
    def backend(self, real_smolvm):
        return SmolmachinesBackend(routes=[], smolvm=real_smolvm)

    @pytest.fixture
    def manifest(self):
        return parse_manifest({"name": "contract", "agent": {"image": "debian:bookworm", "env": {"A": "1"}}})

    @pytest.fixture
    def launchable(self, docker, manifest, real_smolvm, monkeypatch):
        """The bundle image, the real smolvm, and a bundle that "answers" once its container runs.

        The real smolvm creates, lists and deletes the machine; what needs a boot (start, and the probe
        in the running VM) is skipped here. tests/integration runs the whole `up` against a fake VM.
        """
        docker.engine.add_image(manifest.bundle.image)
        booted: set[str] = set()
        listed = Smolvm.machines

        def machines(self):  # the real list, with the machines "started" here shown as a boot would
            return {n: m | ({"state": "running"} if n in booted else {}) for n, m in listed(self).items()}

        monkeypatch.setattr(Smolvm, "start", lambda self, name: booted.add(name))
        monkeypatch.setattr(Smolvm, "machines", machines)
        monkeypatch.setattr(launch.probe, "confined", lambda smolvm, plan, timeout: None)

        bundle_answers_when_running(monkeypatch, docker)
