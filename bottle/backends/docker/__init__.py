"""The docker backend: the agent in a hardened container whose one network it shares with its bundle alone."""

from __future__ import annotations

import sys
from collections.abc import Callable
from ipaddress import IPv4Network
from typing import TYPE_CHECKING

from bottle.addressing import host_routes, pool_from_env
from bottle.backend import Backend, BottleStatus, Check, PreflightReport
from bottle.backends.docker import launch
from bottle.backends.docker.plan import DockerBottlePlan
from bottle.sidecar import seconds_from_env

if TYPE_CHECKING:
    import docker

    from bottle.manifest import Manifest
    from bottle.state import StateStore

__all__ = ["DockerBackend", "DockerBottlePlan"]

# The oldest Engine seen to honour `com.docker.network.bridge.inhibit_ipv4` (no host address on the
# agent's network); an Engine that ignored it would leave the host reachable from the agent.
MIN_ENGINE = (20, 10)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("-")[0].split(".")[:2]:
        parts.append(int(piece) if piece.isdigit() else 0)
    return tuple(parts)


class DockerBackend(Backend):
    """Runs bottles as docker containers. Settings from the environment: $BOTTLE_SUBNET_POOL (default
    192.168.0.0/16) and $BOTTLE_READY_TIMEOUT (seconds `up` waits for the bundle's proxy, default 30)."""

    name = "docker"
    plan_type = DockerBottlePlan

    def __init__(self, *, pool: IPv4Network | None = None, routes: list[IPv4Network] | None = None):
        self.pool = pool or pool_from_env()
        self.routes = host_routes() if routes is None else routes
        self.ready_timeout = seconds_from_env("BOTTLE_READY_TIMEOUT", 30.0)

    def preflight(self, *, docker: docker.DockerClient | None, manifest: Manifest | None = None) -> PreflightReport:
        fix = "start the Docker Engine and make sure this user can use it (DOCKER_HOST or /var/run/docker.sock)"
        if docker is None:
            checks = [Check(name="docker", ok=False, detail="no Docker Engine is reachable", fix=fix)]
            return PreflightReport(backend=self.name, checks=checks)
        try:
            version = docker.version().get("Version", "unknown")
            runtimes = sorted(docker.info().get("Runtimes") or {})
        except Exception as exc:  # any transport or API failure means the same thing to the user
            checks = [Check(name="docker", ok=False, detail=f"the Docker Engine did not answer ({exc})", fix=fix)]
            return PreflightReport(backend=self.name, checks=checks)
        floor = ".".join(map(str, MIN_ENGINE))
        checks = [
            Check(name="docker", ok=_version(version) >= MIN_ENGINE, detail=f"Docker Engine {version} answers",
                  fix=f"upgrade the Docker Engine to {floor} or newer"),  # fmt: skip
            Check(name="runtimes", ok=True, detail=f"registered with the Engine: {', '.join(runtimes) or 'none'} "
                  "([docker] runtime names one of them)"),  # fmt: skip
            Check(name="platform", ok=sys.platform.startswith("linux"), detail=sys.platform,
                  fix="run bottle on a Linux host: it checks the bundle over its container IP, which Docker Desktop "
                      "does not route to the host"),  # fmt: skip
        ]
        return PreflightReport(backend=self.name, checks=checks, facts={"engine_version": version})

    def plan(
        self, manifest: Manifest, *, docker: docker.DockerClient, state: StateStore, preflight: PreflightReport
    ) -> DockerBottlePlan:
        return launch.plan(manifest, docker, state, pool=self.pool, routes=self.routes)

    def prepare(
        self, manifest: Manifest, *, docker: docker.DockerClient, state: StateStore, preflight: PreflightReport
    ) -> DockerBottlePlan:
        return launch.prepare(manifest, docker, state, pool=self.pool, routes=self.routes)

    def up(
        self,
        manifest: Manifest,
        *,
        docker: docker.DockerClient,
        state: StateStore,
        preflight: PreflightReport,
        on_step: Callable[[str, str], None],
    ) -> DockerBottlePlan:
        options = {"pool": self.pool, "routes": self.routes}
        return launch.up(manifest, docker, state, prepare_options=options, on_step=on_step,
                         ready_timeout=self.ready_timeout)  # fmt: skip

    def attach(self, plan: DockerBottlePlan, *, tty: bool) -> int:  # type: ignore[override]
        return launch.attach(plan, tty=tty)

    def run(self, plan: DockerBottlePlan, command: list[str], *, docker: docker.DockerClient,  # type: ignore[override]
            timeout: float) -> tuple[int, str]:  # fmt: skip
        return launch.run(docker, plan, command, timeout)

    def down(self, slug: str, *, docker: docker.DockerClient, state: StateStore) -> list[str]:
        return launch.down(slug, docker, state)

    def inventory(self, *, docker: docker.DockerClient, state: StateStore) -> list[BottleStatus]:
        return launch.inventory(docker, state)
