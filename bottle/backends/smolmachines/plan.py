"""SmolmachinesBottlePlan: everything the launcher needs, decided once by `prepare`."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Literal

from bottle.plan import BottlePlan
from bottle.sidecar import PROXY_PORT, BundleSite


class SmolmachinesBottlePlan(BottlePlan):
    """A bottle on smolvm: the agent VM may reach `bundle_ip` and nothing else."""

    backend: Literal["smolmachines"] = "smolmachines"
    network_name: str
    network_id: str | None  # None only in a plan shown by `bottle plan` before the network exists
    bundle_subnet: IPv4Network
    bundle_gateway: IPv4Address
    bundle_ip: IPv4Address
    bundle_container_name: str
    bundle_image: str
    smolfile_path: Path
    bundle_dir: Path  # the bundle's config, CA and secrets, mounted read-only into the bundle container
    guest_dir: Path  # the CA certificate alone, mounted read-only into the VM
    machine_name: str
    agent_image: str
    agent_command: list[str]
    agent_env: dict[str, str]
    smolvm_version: str | None

    @property
    def allow_cidr(self) -> str:
        """The one CIDR the VM may reach."""
        return f"{self.bundle_ip}/32"

    @property
    def proxy_url(self) -> str:
        return f"http://{self.bundle_ip}:{PROXY_PORT}"

    @property
    def site(self) -> BundleSite:
        return BundleSite(
            backend=self.backend, slug=self.slug, container_name=self.bundle_container_name, image=self.bundle_image,
            network_name=self.network_name, ip=self.bundle_ip, bundle_dir=self.bundle_dir,
        )  # fmt: skip
