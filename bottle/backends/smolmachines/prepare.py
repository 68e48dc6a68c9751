"""The prepare step: pick the bottle's addresses, create its docker network, write its Smolfile."""

from __future__ import annotations

from ipaddress import IPv4Network

import docker

from bottle import sidecar
from bottle.addressing import Addresses
from bottle.backends.smolmachines import smolfile
from bottle.backends.smolmachines.plan import SmolmachinesBottlePlan
from bottle.manifest import Manifest
from bottle.sidecar import NetworkSpec, resource_name
from bottle.state import PLAN_FILE, StateStore
from bottle.undo import Undo

BACKEND = "smolmachines"
SMOLFILE = "Smolfile"


def network_spec(slug: str) -> NetworkSpec:
    """The bottle's one network: the bundle's, reached by the VM through smolvm's allowlist."""
    return NetworkSpec(backend=BACKEND, slug=slug, name=resource_name(slug), key=slug)


def build_plan(
    manifest: Manifest, addresses: Addresses, network_id: str | None, state: StateStore, smolvm_version: str | None
) -> SmolmachinesBottlePlan:
    """Assemble the plan from decisions already made; pure."""
    slug = manifest.slug
    return SmolmachinesBottlePlan(
        name=manifest.name,
        slug=slug,
        network_name=resource_name(slug),
        network_id=network_id,
        bundle_subnet=addresses.subnet,
        bundle_gateway=addresses.gateway,
        bundle_ip=addresses.bundle_ip,
        bundle_container_name=sidecar.bundle_name(slug),
        bundle_image=manifest.bundle.image,
        smolfile_path=state.bottle_dir(slug) / SMOLFILE,
        bundle_dir=state.bottle_dir(slug) / "bundle",
        guest_dir=state.bottle_dir(slug) / "guest",
        machine_name=resource_name(slug),
        agent_image=manifest.agent.image,
        agent_command=manifest.agent.command,
        agent_env=sidecar.agent_env(manifest.agent.env | sidecar.placeholders(manifest), addresses.bundle_ip),
        smolvm_version=smolvm_version,
    )


def plan(
    manifest: Manifest,
    client: docker.DockerClient,
    state: StateStore,
    *,
    pool: IPv4Network,
    routes: list[IPv4Network],
    smolvm_version: str | None,
) -> SmolmachinesBottlePlan:
    """The plan `prepare` would make now; only lists docker networks."""
    addresses, network_id = sidecar.planned_addresses(client, network_spec(manifest.slug), state.owner(), pool, routes)
    return build_plan(manifest, addresses, network_id, state, smolvm_version)


def prepare_parts(
    manifest: Manifest,
    client: docker.DockerClient,
    state: StateStore,
    undo: Undo,
    *,
    pool: IPv4Network,
    routes: list[IPv4Network],
    smolvm_version: str | None,
) -> SmolmachinesBottlePlan:
    """Do `prepare` and save the plan; push onto `undo` how to remove what this call created."""
    slug = manifest.slug
    if state.read(state.bottle_dir(slug) / PLAN_FILE) is None:
        undo.push(f"state {state.bottle_dir(slug)}", lambda: state.remove_bottle(slug))
    owner = state.owner(create=True)
    network = sidecar.ensure_network(client, network_spec(slug), owner, pool, routes, undo)
    addresses = sidecar.adopted_addresses(network)
    result = build_plan(manifest, addresses, network.id, state, smolvm_version)
    data = smolfile.build(result.agent_env, result.bundle_ip, result.bundle_gateway, result.guest_dir)
    state.write_private(result.smolfile_path, smolfile.render(data).encode())
    refuse = [addresses.subnet, IPv4Network(f"{addresses.gateway}/32")]
    sidecar.write_bundle_files(manifest, state, result.bundle_dir, result.guest_dir, refuse)
    state.save_plan(result)
    return result


def prepare(manifest: Manifest, client: docker.DockerClient, state: StateStore, **options) -> SmolmachinesBottlePlan:
    """Create the bottle's network (or adopt it), write its Smolfile and bundle config, save its plan.

    If anything fails, what this call created is removed again.
    """
    return sidecar.prepare(prepare_parts, manifest, client, state, **options)
