"""The smolmachines backend: the agent in a smolvm microVM whose one allowed address is its bundle."""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import TYPE_CHECKING

from bottle.backend import Backend, PreflightReport
from bottle.backends.smolmachines import preflight as checks
from bottle.backends.smolmachines import prepare as steps
from bottle.backends.smolmachines.addressing import host_routes, pool_from_env
from bottle.backends.smolmachines.plan import SmolmachinesBottlePlan

if TYPE_CHECKING:
    import docker

    from bottle.manifest import Manifest
    from bottle.state import StateStore

__all__ = ["SmolmachinesBackend", "SmolmachinesBottlePlan"]


class SmolmachinesBackend(Backend):
    """Runs bottles with smolvm; the subnet pool comes from $BOTTLE_SUBNET_POOL (default 192.168.0.0/16)."""

    name = "smolmachines"
    plan_type = SmolmachinesBottlePlan

    def __init__(
        self, *, pool: IPv4Network | None = None, routes: list[IPv4Network] | None = None, smolvm: str = "smolvm"
    ):
        self.pool = pool or pool_from_env()
        self.routes = host_routes() if routes is None else routes
        self.smolvm = smolvm

    def preflight(self, *, docker: docker.DockerClient | None) -> PreflightReport:
        smolvm, version = checks.check_smolvm(self.smolvm)
        report = [smolvm, checks.check_egress_floor(), checks.check_docker(docker), checks.check_platform()]
        return PreflightReport(backend=self.name, checks=report, facts={"smolvm_version": version} if version else {})

    def plan(
        self, manifest: Manifest, *, docker: docker.DockerClient, state: StateStore, preflight: PreflightReport
    ) -> SmolmachinesBottlePlan:
        return steps.plan(manifest, docker, state, **self._options(preflight))

    def prepare(
        self, manifest: Manifest, *, docker: docker.DockerClient, state: StateStore, preflight: PreflightReport
    ) -> SmolmachinesBottlePlan:
        return steps.prepare(manifest, docker, state, **self._options(preflight))

    def _options(self, preflight: PreflightReport) -> dict:
        return {"pool": self.pool, "routes": self.routes, "smolvm_version": preflight.facts.get("smolvm_version")}
