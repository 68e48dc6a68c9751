"""A contract test suite every backend can run against itself.

Subclass `BackendContract` in a test module and define two fixtures, `backend` (an instance of your
backend) and `manifest` (a `bottle.Manifest` naming it); pytest collects the inherited tests. The
lifecycle tests (`up`, `down`, `inventory`) run against FakeDocker with the manifest's bundle image
present; override the `launchable` fixture to set up whatever else your backend's `up` needs (a fake
VM tool on PATH, say):

    class TestMyBackend(BackendContract):
        @pytest.fixture
        def backend(self):
            return MyBackend()

        @pytest.fixture
        def manifest(self):
            return parse_manifest({"name": "t", "backend": "mine", "agent": {"image": "debian"}})
"""

from __future__ import annotations

import stat

import pytest

from bottle import registry, sidecar
from bottle.backend import Backend, PreflightReport, labels
from bottle.manifest import Manifest
from bottle.state import StateStore
from bottle.testing.fake_docker import FakeDocker


def bundle_answers_when_running(monkeypatch: pytest.MonkeyPatch, docker: FakeDocker) -> None:
    """Make the bundle's readiness check see FakeDocker's containers: an address answers once the
    container holding it runs (no real socket is opened)."""

    def accepts(ip: str, port: int) -> bool:
        return any(
            c["State"]["Running"] and ep["IPAddress"] == ip
            for c in docker.engine.containers.values()
            for ep in c["NetworkSettings"]["Networks"].values()
        )

    monkeypatch.setattr(sidecar, "_tcp_accepts", accepts)


class BackendContract:
    """What bottle relies on from every backend."""

    @pytest.fixture
    def docker(self) -> FakeDocker:
        return FakeDocker()

    @pytest.fixture
    def state(self, tmp_path) -> StateStore:
        return StateStore(tmp_path / "state")

    @pytest.fixture
    def report(self, backend: Backend, docker: FakeDocker) -> PreflightReport:
        return backend.preflight(docker=docker)

    @pytest.fixture
    def launchable(self, docker: FakeDocker, manifest: Manifest) -> None:
        """Make `up` possible on this machine; the default provides only the bundle image."""
        docker.engine.add_image(manifest.bundle.image)

    def test_is_registered_under_its_name(self, backend: Backend) -> None:
        assert registry.load(backend.name) is type(backend)

    def test_preflight_reports_instead_of_raising_without_docker(self, backend: Backend) -> None:
        report = backend.preflight(docker=None)
        assert report.backend == backend.name
        assert all(c.ok or c.detail for c in report.checks)

    def test_plan_changes_nothing(self, backend, manifest: Manifest, docker: FakeDocker, state, report) -> None:
        backend.plan(manifest, docker=docker, state=state, preflight=report)
        assert [c for c in docker.engine.calls if c.method != "GET"] == []
        assert not state.root.exists()

    def test_prepare_twice_is_a_no_op_the_second_time(self, backend, manifest, docker, state, report) -> None:
        first = backend.prepare(manifest, docker=docker, state=state, preflight=report)
        calls = len(docker.engine.calls)
        second = backend.prepare(manifest, docker=docker, state=state, preflight=report)
        assert second == first
        assert [c for c in docker.engine.calls[calls:] if c.method != "GET"] == []

    def test_plan_after_prepare_is_the_prepared_plan(self, backend, manifest, docker, state, report) -> None:
        prepared = backend.prepare(manifest, docker=docker, state=state, preflight=report)
        assert backend.plan(manifest, docker=docker, state=state, preflight=report) == prepared

    def test_plan_round_trips_through_json(self, backend, manifest, docker, state, report) -> None:
        prepared = backend.prepare(manifest, docker=docker, state=state, preflight=report)
        assert isinstance(prepared, backend.plan_type)
        assert backend.plan_type.model_validate_json(prepared.model_dump_json()) == prepared

    def test_prepare_writes_only_private_files_in_private_dirs(self, backend, manifest, docker, state, report):
        backend.prepare(manifest, docker=docker, state=state, preflight=report)
        for path in state.root.rglob("*"):
            assert path.is_relative_to(state.bottle_dir(manifest.slug)) or path.is_dir() or path.name == "owner", path
            if path.is_file() and stat.S_IMODE(path.stat().st_mode) & 0o077:
                # Only a certificate may be readable by others (the agent's user reads the CA's): no key.
                data = path.read_bytes()
                assert data.startswith(b"-----BEGIN CERTIFICATE-----") and b"PRIVATE KEY" not in data, path
            for parent in path.relative_to(state.root).parents:
                assert stat.S_IMODE((state.root / parent).stat().st_mode) & 0o077 == 0, parent

    def test_every_created_network_carries_the_bottle_labels(self, backend, manifest, docker, state, report):
        before = set(docker.engine.networks)
        backend.prepare(manifest, docker=docker, state=state, preflight=report)
        for network_id in set(docker.engine.networks) - before:
            expected = labels(manifest.slug, backend.name, state.owner())
            assert expected.items() <= docker.engine.networks[network_id]["Labels"].items()

    def _up(self, backend, manifest, docker, state, report):
        return backend.up(manifest, docker=docker, state=state, preflight=report, on_step=lambda step, detail: None)

    def test_up_then_down_leaves_nothing(self, backend, manifest, docker, state, report, launchable) -> None:
        networks, containers = set(docker.engine.networks), set(docker.engine.containers)
        plan = self._up(backend, manifest, docker, state, report)
        assert state.read_plan_data(manifest.slug) == plan.model_dump(mode="json")
        [status] = backend.inventory(docker=docker, state=state)
        assert (status.slug, status.state, status.drift) == (manifest.slug, "running", [])
        assert backend.down(manifest.slug, docker=docker, state=state)
        assert backend.inventory(docker=docker, state=state) == []
        assert (set(docker.engine.networks), set(docker.engine.containers)) == (networks, containers)
        assert not state.bottle_dir(manifest.slug).exists()

    def test_up_of_a_running_bottle_creates_nothing(self, backend, manifest, docker, state, report, launchable):
        first = self._up(backend, manifest, docker, state, report)
        resources = (set(docker.engine.networks), set(docker.engine.containers))
        assert self._up(backend, manifest, docker, state, report) == first
        assert (set(docker.engine.networks), set(docker.engine.containers)) == resources

    def test_down_of_an_unknown_bottle_removes_nothing(self, backend, docker, state, launchable) -> None:
        assert backend.down("never-made", docker=docker, state=state) == []
