"""DockerBottlePlan: everything `up` needs to run the agent in a container, decided once by `prepare`."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Literal

from bottle.plan import BottlePlan
from bottle.sidecar import PROXY_PORT, BundleSite


class DockerBottlePlan(BottlePlan):
    """A bottle on Docker: the agent's container has one network, `internal`, shared with its bundle alone.

    The bundle also sits on the bottle's egress network, its way out; the agent is never attached there.
    """

    backend: Literal["docker"] = "docker"
    network_name: str  # internal: no way out, no address of the host's on it
    network_id: str | None  # None only in a plan shown by `bottle plan` before the network exists
    bundle_subnet: IPv4Network
    bundle_ip: IPv4Address
    egress_network_name: str
    egress_network_id: str | None
    egress_subnet: IPv4Network
    egress_ip: IPv4Address  # the bundle's address on the egress network, where the host checks readiness
    bundle_container_name: str
    bundle_image: str
    bundle_dir: Path  # the bundle's config, CA and secrets, mounted read-only into the bundle container
    guest_dir: Path  # the CA certificate alone, mounted read-only into the agent's container
    agent_container_name: str
    agent_image: str
    agent_command: list[str]
    agent_env: dict[str, str]
    runtime: str | None
    memory: str
    cpus: float
    pids: int
    user: str | None
    workspace: Path | None

    @property
    def proxy_url(self) -> str:
        return f"http://{self.bundle_ip}:{PROXY_PORT}"

    @property
    def site(self) -> BundleSite:
        return BundleSite(
            backend=self.backend, slug=self.slug, container_name=self.bundle_container_name, image=self.bundle_image,
            network_name=self.network_name, ip=self.bundle_ip, bundle_dir=self.bundle_dir,
            egress_network=self.egress_network_name, egress_ip=self.egress_ip,
        )  # fmt: skip
