"""The smolmachines backend: the agent in a smolvm microVM whose one allowed address is its bundle."""

from __future__ import annotations

import os
from collections.abc import Callable
from ipaddress import IPv4Network
from typing import TYPE_CHECKING

from bottle.backend import Backend, BottleStatus, PreflightReport
from bottle.backends.smolmachines import launch
from bottle.backends.smolmachines import preflight as checks
from bottle.backends.smolmachines import prepare as steps
from bottle.backends.smolmachines.addressing import host_routes, pool_from_env
from bottle.backends.smolmachines.plan import SmolmachinesBottlePlan
from bottle.backends.smolmachines.smolvm import Smolvm
from bottle.errors import UsageError

if TYPE_CHECKING:
    import docker

    from bottle.manifest import Manifest
    from bottle.state import StateStore

__all__ = ["SmolmachinesBackend", "SmolmachinesBottlePlan"]


def _seconds_from_env(name: str, default: float) -> float:
    text = os.environ.get(name)
    try:
        seconds = float(text) if text else default
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 86400:
        raise UsageError(f"{name}={text!r} must be a number of seconds between 0 and 86400")
    return seconds


class SmolmachinesBackend(Backend):
    """Runs bottles with smolvm.

    Machine settings come from the environment: $BOTTLE_SUBNET_POOL (default 192.168.0.0/16) and
    $BOTTLE_READY_TIMEOUT, the seconds `up` waits for the bundle's proxy to answer (default 30).
    """

    name = "smolmachines"
    plan_type = SmolmachinesBottlePlan

    def __init__(
        self, *, pool: IPv4Network | None = None, routes: list[IPv4Network] | None = None, smolvm: str = "smolvm"
    ):
        self.pool = pool or pool_from_env()
        self.routes = host_routes() if routes is None else routes
        self.smolvm = smolvm
        self.ready_timeout = _seconds_from_env("BOTTLE_READY_TIMEOUT", 30.0)

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

    def up(
        self,
        manifest: Manifest,
        *,
        docker: docker.DockerClient,
        state: StateStore,
        preflight: PreflightReport,
        on_step: Callable[[str, str], None],
        repack: bool = False,
    ) -> SmolmachinesBottlePlan:
        return launch.up(
            manifest,
            docker,
            state,
            Smolvm(self.smolvm),
            prepare_options=self._options(preflight),
            on_step=on_step,
            repack=repack,
            ready_timeout=self.ready_timeout,
        )

    def attach(self, plan: SmolmachinesBottlePlan, *, tty: bool) -> int:  # type: ignore[override]
        return Smolvm(self.smolvm).attach(plan.machine_name, plan.agent_command, tty=tty)

    def down(self, slug: str, *, docker: docker.DockerClient, state: StateStore) -> list[str]:
        return launch.down(slug, docker, state, Smolvm(self.smolvm))

    def inventory(self, *, docker: docker.DockerClient, state: StateStore) -> list[BottleStatus]:
        return launch.inventory(docker, state, Smolvm(self.smolvm))

    def _options(self, preflight: PreflightReport) -> dict:
        return {"pool": self.pool, "routes": self.routes, "smolvm_version": preflight.facts.get("smolvm_version")}
