"""bottle's backend contract, run against the kubernetes backend on the real test API server (the test
plays the kubelet; see test_kubernetes.py)."""

import threading
import uuid

import kubernetes
import pytest

from bottle.backends.kubernetes import KubernetesBackend
from bottle.manifest import parse_manifest
from bottle.testing.contract import BackendContract
from bottle.testing.kube_apiserver import play_kubelet
from tests.integration.test_kubernetes import sweep

pytestmark = pytest.mark.integration


class TestKubernetesContract(BackendContract):
    @pytest.fixture
    def backend(self, kube):
        return KubernetesBackend()

    @pytest.fixture
    def manifest(self, kube):
        # A name of its own for each test: a deleted Namespace stays Terminating on this API server.
        found = parse_manifest({"name": f"contract-{uuid.uuid4().hex[:8]}", "backend": "kubernetes",
                                "agent": {"image": "agent:1", "env": {"A": "1"}}})  # fmt: skip
        yield found
        sweep(kube, found.slug)

    @pytest.fixture
    def launchable(self, kube, manifest):
        stop = threading.Event()
        play_kubelet(kubernetes.client.CoreV1Api(kube), f"bottle-{manifest.slug}", stop)
        yield
        stop.set()

    def test_preflight_reports_instead_of_raising_without_docker(self, backend, monkeypatch, tmp_path) -> None:
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))  # and without a cluster
        super().test_preflight_reports_instead_of_raising_without_docker(backend)
