"""The prepare step: pick the bottle's addresses, create its docker network, write its Smolfile."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network

import docker
import requests
from docker.models.networks import Network
from docker.types import IPAMConfig, IPAMPool

from bottle.backend import LABEL_ROLE, label_filter, labels, owned_slug
from bottle.backends.smolmachines import smolfile
from bottle.backends.smolmachines.smolfile import GUEST_DIR
from bottle.backends.smolmachines.addressing import Addresses, derive_subnet, ipv4_subnets
from bottle.backends.smolmachines.plan import PROXY_PORT, SmolmachinesBottlePlan
from bottle.bundle import CA_DIR, CONFIG_FILE
from bottle.bundle.ca import CA_FILE, create_ca, split_ca
from bottle.bundle.policy import BundleConfig, Credential
from bottle.errors import BottleError, DockerProblem, UsageError
from bottle.manifest import PLACEHOLDER, Manifest
from bottle.state import PLAN_FILE, StateStore
from bottle.undo import Undo

BACKEND = "smolmachines"
SMOLFILE = "Smolfile"
GUEST_CA_PATH = f"{GUEST_DIR}/ca.pem"  # the bundle's CA certificate, inside the VM
NO_PROXY = "localhost,127.0.0.1,::1"  # loopback stays inside the VM; everything else goes to the bundle
CREATE_ATTEMPTS = 10


def resource_name(slug: str) -> str:
    """The name of the bottle's docker network and smolvm machine."""
    return f"bottle-{slug}"


def agent_env(env: Mapping[str, str], bundle_ip: IPv4Address) -> dict[str, str]:
    """The VM's environment: the manifest's env plus the proxy settings, IP literals only (no DNS in the VM)."""
    proxy = f"http://{bundle_ip}:{PROXY_PORT}"
    ours = {"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "NO_PROXY": NO_PROXY}
    merged = dict(env) | ours | {k.lower(): v for k, v in ours.items()} | {"NODE_EXTRA_CA_CERTS": GUEST_CA_PATH}
    return dict(sorted(merged.items()))


def placeholders(manifest: Manifest) -> dict[str, str]:
    """The VM variables credentials ask for, each holding PLACEHOLDER: a value that is not a secret."""
    return {c.agent_placeholder: PLACEHOLDER for c in manifest.egress.credentials if c.agent_placeholder}


def bundle_config(manifest: Manifest, addresses: Addresses) -> bytes:
    """The bundle's policy, rendered from the manifest; credentials name their secrets, never hold them."""
    config = BundleConfig(
        port=PROXY_PORT,
        allow=manifest.egress.allow,
        credentials=[
            Credential(host=c.host, header=c.header, template=c.template, secret=secret_name(i))
            for i, c in enumerate(manifest.egress.credentials)
        ],
        refuse=[addresses.subnet, IPv4Network(f"{addresses.gateway}/32")],
    )
    return config.model_dump_json(indent=2).encode() + b"\n"


def secret_name(index: int) -> str:
    return f"credential-{index}"


def ensure_ca(plan: SmolmachinesBottlePlan, state: StateStore) -> None:
    """Make the bottle's CA once, key and cert for the bundle (0600), and the cert alone for the VM.

    The two files are checked together on every run: a CA file that does not parse is made anew, and a
    guest certificate that is missing or not the CA's own (a crash between the two writes) is rewritten.
    """
    ca_file = plan.bundle_dir / CA_DIR / CA_FILE
    guest_file = plan.guest_dir / "ca.pem"
    found = state.read(ca_file)
    pair = split_ca(found) if found else None
    if pair is None:
        pair = create_ca(f"bottle {plan.slug} CA")
        state.write_private(ca_file, pair[0] + pair[1])
    cert_pem = pair[1]
    if state.read(guest_file) != cert_pem:
        state.write_private(guest_file, cert_pem)


def survey(client: docker.DockerClient, slug: str, owner: str | None) -> tuple[Network | None, list[IPv4Network]]:
    """Find this bottle's own network (by its owner's labels) and the subnets every other network holds."""
    own: Network | None = None
    taken: list[IPv4Network] = []
    name = resource_name(slug)
    for network in client.networks.list():
        if owned_slug(network.attrs.get("Labels"), BACKEND, owner) == slug:
            if own is not None:
                raise DockerProblem(
                    f"docker networks {own.name} and {network.name} both claim bottle '{slug}'; "
                    f"remove the stray one with `docker network rm`"
                )
            own = network
        elif network.name == name:
            raise UsageError(
                f"a docker network named '{name}' exists but this bottle state directory did not create it; "
                f"remove it (`docker network rm {name}`) or rename the bottle"
            )
        else:
            taken.extend(ipv4_subnets(network.attrs))
    return own, taken


def check_members(client: docker.DockerClient, network: Network, slug: str, owner: str) -> None:
    """Refuse to adopt a network that holds a container other than this bottle's own bundle.

    Anything else on the network could reach the bundle's proxy port and borrow its credentials; a
    stopped container counts too, since it can be started later.
    """
    # The Engine matches a container that never started by the network's name only, a started one by either.
    for container in client.containers.list(all=True, filters={"network": network.name}):
        found = container.labels or {}
        if owned_slug(found, BACKEND, owner) != slug or found.get(LABEL_ROLE) != "bundle":
            raise BottleError(
                f"docker network {network.name} has container '{container.name}' attached, which is not this "
                f"bottle's bundle and could reach its proxy; remove it (`docker network disconnect -f "
                f"{network.name} {container.name}`) and try again"
            )


def adopted_addresses(network: Network) -> Addresses:
    subnets = ipv4_subnets(network.attrs)
    if len(subnets) != 1 or subnets[0].prefixlen != 24:
        raise DockerProblem(
            f"docker network {network.name} is labelled as a bottle's but has no single IPv4 /24; "
            f"remove it with `docker network rm {network.name}` and run prepare again"
        )
    return Addresses.of(subnets[0])


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
        bundle_container_name=f"{resource_name(slug)}-bundle",
        bundle_image=manifest.bundle.image,
        smolfile_path=state.bottle_dir(slug) / SMOLFILE,
        bundle_dir=state.bottle_dir(slug) / "bundle",
        guest_dir=state.bottle_dir(slug) / "guest",
        machine_name=resource_name(slug),
        agent_image=manifest.agent.image,
        agent_command=manifest.agent.command,
        agent_env=agent_env(manifest.agent.env | placeholders(manifest), addresses.bundle_ip),
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
    own, taken = survey(client, manifest.slug, state.owner())
    if own is not None:
        return build_plan(manifest, adopted_addresses(own), own.id, state, smolvm_version)
    addresses = Addresses.of(derive_subnet(manifest.slug, pool, taken + routes))
    return build_plan(manifest, addresses, None, state, smolvm_version)


def _remove_networks(client: docker.DockerClient, slug: str, owner: str) -> None:
    for network in client.networks.list(filters={"label": label_filter(labels(slug, BACKEND, owner))}):
        network.remove()


def _create_network(
    client: docker.DockerClient, slug: str, owner: str, pool: IPv4Network, routes: list[IPv4Network], undo: Undo
) -> tuple[Network, bool]:
    """Adopt the bottle's network or create it; return it and whether this call created it."""
    lost: list[IPv4Network] = []  # subnets another process won while we tried; never tried twice
    for _ in range(CREATE_ATTEMPTS):
        own, taken = survey(client, slug, owner)
        if own is not None:
            check_members(client, own, slug, owner)
            return own, False
        addresses = Addresses.of(derive_subnet(slug, pool, taken + routes + lost))
        ipam = IPAMConfig(pool_configs=[IPAMPool(subnet=str(addresses.subnet), gateway=str(addresses.gateway))])
        try:
            network = client.networks.create(
                resource_name(slug), driver="bridge", ipam=ipam, labels=labels(slug, BACKEND, owner),
                check_duplicate=True,
            )  # fmt: skip
            return network, True
        except docker.errors.APIError as exc:
            # Another process took the name or the subnet between our look and our create: look again,
            # after a short random pause so that processes racing for the same slot fall out of step.
            if exc.status_code == 409 or "overlaps" in (exc.explanation or ""):
                lost.append(addresses.subnet)
                time.sleep(random.uniform(0.01, 0.1))
                continue
            raise DockerProblem(f"docker refused to create network {resource_name(slug)}: {exc.explanation}") from exc
        except requests.exceptions.RequestException:  # (APIError is one too: it is caught above)
            # The Engine may have made the network and lost only its answer: undo it by its labels.
            undo.push(f"network {resource_name(slug)}", lambda: _remove_networks(client, slug, owner))
            raise
    raise DockerProblem(
        f"could not reserve a subnet for bottle '{slug}' after {CREATE_ATTEMPTS} attempts, "
        "because other networks kept taking them; try again"
    )


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
    network, created = _create_network(client, slug, owner, pool, routes, undo)
    if created:
        undo.push(f"network {network.name}", network.remove)
    addresses = adopted_addresses(network)
    result = build_plan(manifest, addresses, network.id, state, smolvm_version)
    data = smolfile.build(result.agent_env, result.bundle_ip, result.bundle_gateway, result.guest_dir)
    rendered = smolfile.render(data)
    state.write_private(result.smolfile_path, rendered.encode())
    state.write_private(result.bundle_dir / CONFIG_FILE, bundle_config(manifest, addresses))
    ensure_ca(result, state)
    state.save_plan(result)
    return result


def prepare(manifest: Manifest, client: docker.DockerClient, state: StateStore, **options) -> SmolmachinesBottlePlan:
    """Create the bottle's network (or adopt it), write its Smolfile and bundle config, save its plan.

    If anything fails, what this call created is removed again.
    """
    undo = Undo()
    try:
        return prepare_parts(manifest, client, state, undo, **options)
    except Exception as exc:
        if left := undo.leftovers(manifest.slug):
            raise BottleError(f"{exc}; {left}") from exc
        raise
    except BaseException:
        undo.run()
        raise
