"""The smolmachines backend: the agent in a smolvm microVM whose one allowed address is its bundle."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Network
from typing import TYPE_CHECKING

from bottle.backend import Backend, BottleStatus, PreflightReport
from bottle.backends.smolmachines import launch
from bottle.backends.smolmachines import preflight as checks
from bottle.backends.smolmachines import prepare as steps
from bottle.addressing import host_routes, pool_from_env
from bottle.backends.smolmachines.plan import SmolmachinesBottlePlan
from bottle.backends.smolmachines.smolvm import Smolvm
from bottle.backends.smolmachines.smolvm import find as find_smolvm
from bottle.errors import EnvironmentProblem
from bottle.sidecar import seconds_from_env
from bottle.state import StateStore

if TYPE_CHECKING:
    import docker

    from bottle.manifest import Manifest

__all__ = ["SmolmachinesBackend", "SmolmachinesBottlePlan"]


class SmolmachinesBackend(Backend):
    """Runs bottles with smolvm.

    Machine settings come from the environment: $BOTTLE_SUBNET_POOL (default 192.168.0.0/16),
    $BOTTLE_READY_TIMEOUT, the seconds `up` waits for the bundle's proxy to answer (default 30),
    $BOTTLE_PROBE_TIMEOUT, the seconds the confinement probe may take (default 60), and which smolvm
    to drive (`smolvm.find`).
    """

    name = "smolmachines"
    plan_type = SmolmachinesBottlePlan

    def __init__(
        self, *, pool: IPv4Network | None = None, routes: list[IPv4Network] | None = None, smolvm: Smolvm | None = None
    ):
        self.pool = pool or pool_from_env()
        self.routes = host_routes() if routes is None else routes
        self._smolvm = smolvm
        self.ready_timeout = seconds_from_env("BOTTLE_READY_TIMEOUT", 30.0)
        self.probe_timeout = seconds_from_env("BOTTLE_PROBE_TIMEOUT", 60.0)

    def smolvm(self, state: StateStore | None = None) -> Smolvm | None:
        """The smolvm to drive (see `smolvm.find`), looked up once."""
        if self._smolvm is None:
            self._smolvm = find_smolvm(state or StateStore())
        return self._smolvm

    def _installed_smolvm(self, state: StateStore | None = None) -> Smolvm:
        """The smolvm to drive; preflight has already refused without one, a caller that skipped it gets
        the same words."""
        smolvm = self.smolvm(state)
        if smolvm is None:
            raise EnvironmentProblem(f"smolvm is not installed: {checks.INSTALL_SMOLVM}")
        return smolvm

    def preflight(self, *, docker: docker.DockerClient | None, manifest: Manifest | None = None) -> PreflightReport:
        smolvm, version = checks.check_smolvm(self.smolvm())
        report = [smolvm, checks.check_settings(), checks.check_docker(docker), checks.check_platform()]
        return PreflightReport(backend=self.name, checks=report, facts={"smolvm_version": version} if version else {})

    def plan(
        self, manifest: Manifest, *, docker: docker.DockerClient, state: StateStore, preflight: PreflightReport
    ) -> SmolmachinesBottlePlan:
        return steps.plan(manifest, docker, state, **self._options(preflight))

    def prepare(
        self, manifest: Manifest, *, docker: docker.DockerClient, state: StateStore, preflight: PreflightReport
    ) -> SmolmachinesBottlePlan:
        return steps.prepare(manifest, docker, state, **self._options(preflight))

    def up(
        self,
        manifest: Manifest,
        *,
        docker: docker.DockerClient,
        state: StateStore,
        preflight: PreflightReport,
        on_step: Callable[[str, str], None],
    ) -> SmolmachinesBottlePlan:
        return launch.up(
            manifest,
            docker,
            state,
            self._installed_smolvm(state),
            prepare_options=self._options(preflight),
            on_step=on_step,
            ready_timeout=self.ready_timeout,
            probe_timeout=self.probe_timeout,
        )

    def attach(self, plan: SmolmachinesBottlePlan, *, tty: bool) -> int:  # type: ignore[override]
        return self._installed_smolvm().attach(plan.machine_name, plan.agent_command, tty=tty)

    def run(self, plan: SmolmachinesBottlePlan, command: list[str], *, docker: docker.DockerClient,  # type: ignore[override]
            timeout: float) -> tuple[int, str]:  # fmt: skip
        result = self._installed_smolvm().exec("exec", plan.machine_name, command, timeout=timeout)
        return result.returncode, result.stdout + result.stderr

    def down(self, slug: str, *, docker: docker.DockerClient, state: StateStore) -> list[str]:
        return launch.down(slug, docker, state, self.smolvm(state))

    def inventory(self, *, docker: docker.DockerClient, state: StateStore) -> list[BottleStatus]:
        return launch.inventory(docker, state, self.smolvm(state))

    def _options(self, preflight: PreflightReport) -> dict:
        return {"pool": self.pool, "routes": self.routes, "smolvm_version": preflight.facts.get("smolvm_version")}
