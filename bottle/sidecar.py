"""The bundle's host side, the same for every backend: its network, CA, config, secrets, its container at
a pinned IP, readiness, and finding and removing all of it again by label.

A backend decides where its agent runs; everything here is about the bundle beside it. Every function
takes the backend's name, since that name is part of the labels that make a resource a bottle's own.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import docker
import requests
from docker.models.containers import Container
from docker.models.networks import Network
from docker.types import IPAMConfig, IPAMPool
from pydantic import BaseModel, ValidationError

from bottle.addressing import Addresses, derive_subnet, ipv4_subnets
from bottle.backend import (
    LABEL_BACKEND, LABEL_MANAGED, LABEL_OWNER, LABEL_ROLE, LABEL_SLUG, BottleStatus, label_filter, labels, owned_slug,
    why_not_owned,
)  # fmt: skip
from bottle.bundle import CA_DIR, CONFIG_FILE, SECRETS_FILE
from bottle.bundle.ca import CA_FILE, create_ca, split_ca
from bottle.bundle.policy import BundleConfig, Credential, IPNetwork, is_header_value
from bottle.errors import BottleError, DockerProblem, StateError, StepFailed, UsageError
from bottle.manifest import PLACEHOLDER, Manifest
from bottle.state import StateStore
from bottle.undo import Undo, reason

Progress = Callable[[str, str], None]  # on_step(step, detail)
PROXY_PORT = 8888
GUEST_DIR = "/etc/bottle"  # where the agent finds the bundle's CA certificate, read-only
GUEST_CA_PATH = f"{GUEST_DIR}/ca.pem"
NO_PROXY = "localhost,127.0.0.1,::1"  # loopback stays with the agent; everything else goes to the bundle
CREATE_ATTEMPTS = 10
BUNDLE = "bundle"  # the bundle container's role label
LABEL_CONFIG = "bottle.config"  # a digest of what a container was made from; one that differs is made anew


def seconds_from_env(name: str, default: float) -> float:
    """A timeout from the environment, in seconds; a bad value is a usage error naming the variable."""
    text = os.environ.get(name)
    try:
        seconds = float(text) if text else default
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 86400:
        raise UsageError(f"{name}={text!r} must be a number of seconds between 0 and 86400")
    return seconds


def resource_name(slug: str) -> str:
    """The name of the bottle's own docker network (and of its smolvm machine)."""
    return f"bottle-{slug}"


def bundle_name(slug: str) -> str:
    return f"{resource_name(slug)}-bundle"


# -- what the agent is told, and what the bundle is told ---------------------------------------------------


def agent_env(env: Mapping[str, str], bundle_ip: IPv4Address) -> dict[str, str]:
    """The agent's environment: the manifest's env plus the proxy settings, IP literals only (no DNS)."""
    proxy = f"http://{bundle_ip}:{PROXY_PORT}"
    ours = {"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "NO_PROXY": NO_PROXY}
    merged = dict(env) | ours | {k.lower(): v for k, v in ours.items()} | {"NODE_EXTRA_CA_CERTS": GUEST_CA_PATH}
    return dict(sorted(merged.items()))


def placeholders(manifest: Manifest) -> dict[str, str]:
    """The agent variables credentials ask for, each holding PLACEHOLDER: a value that is not a secret."""
    return {c.agent_placeholder: PLACEHOLDER for c in manifest.egress.credentials if c.agent_placeholder}


def secret_name(index: int) -> str:
    return f"credential-{index}"


def bundle_config(manifest: Manifest, refuse: Sequence[IPNetwork], clients: Sequence[IPNetwork] = (),
                  dns_port: int = 53) -> bytes:  # fmt: skip
    """The bundle's policy, rendered from the manifest; credentials name their secrets, never hold them.

    `refuse` lists the bottle's own networks and gateways: the bundle never connects there, whatever a
    rule opts in. `clients`, when given, are the only addresses the proxy serves: the agent's network.
    """
    config = BundleConfig(
        port=PROXY_PORT,
        allow=manifest.egress.allow,
        credentials=[
            Credential(host=c.host, header=c.header, template=c.template, secret=secret_name(i))
            for i, c in enumerate(manifest.egress.credentials)
        ],
        refuse=list(refuse),
        clients=list(clients),
        dns_port=dns_port,
    )
    return config.model_dump_json(indent=2).encode() + b"\n"


def ensure_ca(state: StateStore, slug: str, bundle_dir: Path, guest_dir: Path) -> None:
    """Make the bottle's CA once, key and cert for the bundle (0600), and the cert alone for the agent.

    The two files are checked together on every run: a CA file that does not parse is made anew, and a
    guest certificate that is missing or not the CA's own (a crash between the two writes) is rewritten.
    The guest's copy is a public certificate, readable by the agent's unprivileged user (0644); it lives
    in the bottle's 0700 directory like everything else.
    """
    ca_file = bundle_dir / CA_DIR / CA_FILE
    guest_file = guest_dir / "ca.pem"
    found = state.read(ca_file)
    pair = split_ca(found) if found else None
    if pair is None:
        pair = create_ca(f"bottle {slug} CA")
        state.write_private(ca_file, pair[0] + pair[1])
    cert_pem = pair[1]
    if state.read(guest_file) != cert_pem or not state.is_file(guest_file, mode=0o644):
        state.write_private(guest_file, cert_pem, mode=0o644)


def write_secrets(manifest: Manifest, bundle_dir: Path, state: StateStore) -> None:
    """Read each credential's secret on the host and hand it to the bundle only (0600, never to the agent)."""
    secrets = {}
    for index, credential in enumerate(manifest.egress.credentials):
        if credential.from_env is not None:
            value = os.environ.get(credential.from_env)
            source = f"${credential.from_env}"
        else:
            path = Path(credential.from_file or "").expanduser()
            source = str(path)
            try:
                value = path.read_text().strip()
            except OSError as exc:
                raise StepFailed("secrets", f"credential for {credential.host}: cannot read {source} ({exc.strerror})")
        if not value:
            raise StepFailed("secrets", f"credential for {credential.host}: {source} is not set or empty")
        if not is_header_value(value):
            raise StepFailed(
                "secrets", f"credential for {credential.host}: {source} holds a line break or control character"
            )
        secrets[secret_name(index)] = value
    state.write_private(bundle_dir / SECRETS_FILE, json.dumps(secrets).encode())


def write_bundle_files(
    manifest: Manifest, state: StateStore, bundle_dir: Path, guest_dir: Path, refuse: Sequence[IPNetwork],
    clients: Sequence[IPNetwork] = (), dns_port: int = 53,
) -> None:
    """The bundle's config and CA (and the CA's certificate for the agent); secrets come at `up`."""
    state.write_private(bundle_dir / CONFIG_FILE, bundle_config(manifest, refuse, clients, dns_port))
    ensure_ca(state, manifest.slug, bundle_dir, guest_dir)


# -- networks ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkSpec:
    """One of a bottle's docker networks: its name, its role label, and how docker should make it.

    `key` is what its /24 is derived from (the slug, for the bottle's main network), so each network of
    a bottle has a stable subnet of its own. `role` None is the bottle's main network, as the
    smolmachines backend has always labelled it.
    """

    backend: str
    slug: str
    name: str
    key: str
    role: str | None = None
    internal: bool = False
    options: Mapping[str, str] = field(default_factory=dict)
    members: frozenset[str] = frozenset({BUNDLE})  # the roles of the containers allowed on it

    def labels(self, owner: str) -> dict[str, str]:
        return labels(self.slug, self.backend, owner) | ({LABEL_ROLE: self.role} if self.role else {})

    def owns(self, network: Network, owner: str | None) -> bool:
        found = network.attrs.get("Labels") or {}
        return owned_slug(found, self.backend, owner) == self.slug and found.get(LABEL_ROLE) == self.role


def survey(client: docker.DockerClient, spec: NetworkSpec, owner: str | None) -> tuple[Network | None, list[IPv4Network]]:
    """Find this network (by its owner's labels and role) and the subnets every other network holds."""
    own: Network | None = None
    taken: list[IPv4Network] = []
    for network in client.networks.list():
        if spec.owns(network, owner):
            if own is not None:
                raise DockerProblem(
                    f"docker networks {own.name} and {network.name} both claim bottle '{spec.slug}'; "
                    f"remove the stray one with `docker network rm`"
                )
            own = network
        elif network.name == spec.name:
            raise UsageError(
                f"a docker network named '{spec.name}' exists but this bottle state directory did not create it; "
                f"remove it (`docker network rm {spec.name}`) or rename the bottle"
            )
        else:
            taken.extend(ipv4_subnets(network.attrs))
    return own, taken


def check_members(client: docker.DockerClient, network: Network, spec: NetworkSpec, owner: str) -> None:
    """Refuse to adopt a network that holds a container other than this bottle's own.

    Anything else on the network could reach the bundle's proxy port and borrow its credentials; a
    stopped container counts too, since it can be started later.
    """
    # The Engine matches a container that never started by the network's name only, a started one by either.
    for container in client.containers.list(all=True, filters={"network": network.name}, ignore_removed=True):
        found = container.labels or {}
        if owned_slug(found, spec.backend, owner) != spec.slug or found.get(LABEL_ROLE) not in spec.members:
            raise BottleError(
                f"docker network {network.name} has container '{container.name}' attached, which is not this "
                f"bottle's own and could reach its proxy; remove it (`docker network disconnect -f "
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


def planned_addresses(
    client: docker.DockerClient, spec: NetworkSpec, owner: str | None, pool: IPv4Network, routes: list[IPv4Network],
    also_taken: Sequence[IPv4Network] = (),
) -> tuple[Addresses, str | None]:
    """The addresses the network has, or would get if it were made now, and its ID if it exists; only looks."""
    own, taken = survey(client, spec, owner)
    if own is not None:
        return adopted_addresses(own), own.id
    return Addresses.of(derive_subnet(spec.key, pool, [*taken, *routes, *also_taken])), None


def _remove_networks(client: docker.DockerClient, spec: NetworkSpec, owner: str) -> None:
    for network in client.networks.list(filters={"label": label_filter(spec.labels(owner))}):
        if spec.owns(network, owner):
            network.remove()


def ensure_network(
    client: docker.DockerClient, spec: NetworkSpec, owner: str, pool: IPv4Network, routes: list[IPv4Network],
    undo: Undo,
) -> Network:
    """Adopt the network or create it at the first free /24 for its key; undo a creation on failure."""
    lost: list[IPv4Network] = []  # subnets another process won while we tried; never tried twice
    for _ in range(CREATE_ATTEMPTS):
        own, taken = survey(client, spec, owner)
        if own is not None:
            check_members(client, own, spec, owner)
            return own
        addresses = Addresses.of(derive_subnet(spec.key, pool, taken + routes + lost))
        ipam = IPAMConfig(pool_configs=[IPAMPool(subnet=str(addresses.subnet), gateway=str(addresses.gateway))])
        try:
            network = client.networks.create(
                spec.name, driver="bridge", ipam=ipam, labels=spec.labels(owner), internal=spec.internal,
                options=dict(spec.options), check_duplicate=True,
            )  # fmt: skip
        except docker.errors.APIError as exc:
            # Another process took the name or the subnet between our look and our create: look again,
            # after a short random pause so that processes racing for the same slot fall out of step.
            if exc.status_code == 409 or "overlaps" in (exc.explanation or ""):
                lost.append(addresses.subnet)
                time.sleep(random.uniform(0.01, 0.1))
                continue
            raise DockerProblem(f"docker refused to create network {spec.name}: {exc.explanation}") from exc
        except requests.exceptions.RequestException:  # (APIError is one too: it is caught above)
            # The Engine may have made the network and lost only its answer: undo it by its labels.
            undo.push(f"network {spec.name}", lambda: _remove_networks(client, spec, owner))
            raise
        undo.push(f"network {network.name}", network.remove)
        return network
    raise DockerProblem(
        f"could not reserve a subnet for bottle '{spec.slug}' after {CREATE_ATTEMPTS} attempts, "
        "because other networks kept taking them; try again"
    )


# -- containers -------------------------------------------------------------------------------------------


def find_container(client: docker.DockerClient, name: str, backend: str, slug: str, role: str, owner: str) -> Container | None:
    """The bottle's container of that name and role; None if there is none; refuse one that is not ours."""
    try:
        container = client.containers.get(name)
    except docker.errors.NotFound:
        return None
    found = container.labels or {}
    if owned_slug(found, backend, owner) != slug or found.get(LABEL_ROLE) != role:
        raise BottleError(
            f"a container named '{name}' exists but this bottle state directory did not create it; "
            f"remove it (`docker rm -f {name}`) or rename the bottle"
        )
    return container


def require_image(client: docker.DockerClient, image: str, step: str, what: str) -> None:
    """Never pull implicitly: a missing local image stops the step with a sentence."""
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise StepFailed(step, f"the {what} image '{image}' is not on this machine; build or load it first") from None


class BundleSite(BaseModel):
    """Where a bottle's bundle runs: what `start_bundle` and `wait_until_ready` need from a plan."""

    backend: str
    slug: str
    container_name: str
    image: str
    network_name: str  # the network the agent reaches it on, where it has its pinned IP
    ip: IPv4Address
    bundle_dir: Path  # the bundle's config, CA and secrets, mounted read-only at /etc/bottle
    egress_network: str | None = None  # its way out, when the agent's network has none
    egress_ip: IPv4Address | None = None  # its pinned address there


def bundle_digest(state: StateStore, site: BundleSite, image_id: str) -> str:
    """What the running bundle was started with: its config, secrets, image and place, as a keyed digest.

    The key is the bottle's CA (private to the state directory), so the label shows no secret, not even
    to someone who could guess one and hash it.
    """
    key = state.read(site.bundle_dir / CA_DIR / CA_FILE) or b""
    made_from = [state.read(site.bundle_dir / name) or b"" for name in (CONFIG_FILE, SECRETS_FILE)]
    made_from += [image_id.encode(), site.model_dump_json().encode()]
    return hmac.new(key, b"\0".join(made_from), hashlib.sha256).hexdigest()[:32]


def start_bundle(client: docker.DockerClient, site: BundleSite, owner: str, state: StateStore, undo: Undo) -> Container:
    """Run the bundle at its pinned IP, config mounted read-only; adopt it if it runs with exactly this
    config, secrets and image (the policy of a changed manifest takes effect at the next `up`)."""
    require_image(client, site.image, "bundle start", "bundle")
    digest = bundle_digest(state, site, client.images.get(site.image).id)
    container = find_container(client, site.container_name, site.backend, site.slug, BUNDLE, owner)
    if container is not None:
        if container.labels.get(LABEL_CONFIG) == digest:
            if container.status != "running":
                container.start()
            return container
        container.remove(force=True)  # made from another config, secret or image: start it anew
    endpoint = client.api.create_endpoint_config(ipv4_address=str(site.ip))
    cpus = min(2, os.cpu_count() or 1)
    container = client.containers.create(
        site.image,
        name=site.container_name,
        labels=labels(site.slug, site.backend, owner) | {LABEL_ROLE: BUNDLE, LABEL_CONFIG: digest},
        network=site.network_name,
        networking_config={site.network_name: endpoint},
        volumes={str(site.bundle_dir): {"bind": "/etc/bottle", "mode": "ro"}},
        user=f"{os.getuid()}:{os.getgid()}",  # the owner of the 0600 config, CA and secrets it reads
        environment={"HOME": "/tmp"},
        read_only=True,
        tmpfs={"/tmp": "size=64m,mode=1777"},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        restart_policy={"Name": "unless-stopped"},
        # The audit log is the container's stdout: an agent flooding the bundle must not fill the host's disk.
        log_config={"Type": "json-file", "Config": {"max-size": "50m", "max-file": "5"}},
        # Nor its memory, processes or CPUs; the bundle forwards nothing it does not proxy.
        mem_limit="1g",
        memswap_limit="1g",
        pids_limit=256,
        nano_cpus=int(cpus * 1e9),
        # It forwards nothing, and answers ARP on each network for that network's own address alone.
        sysctls={"net.ipv4.ip_forward": "0", "net.ipv4.conf.all.arp_ignore": "1"},
    )
    undo.push(f"container {container.name}", lambda: container.remove(force=True))
    try:
        if site.egress_network:
            client.networks.get(site.egress_network).connect(container, ipv4_address=str(site.egress_ip))
        container.start()
    except docker.errors.APIError as exc:
        raise StepFailed("bundle start", f"docker could not start the bundle: {exc.explanation}") from None
    container.reload()
    return container


def _tcp_accepts(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until_ready(client: docker.DockerClient, container_name: str, ip: IPv4Address | str, timeout: float) -> None:
    """Wait until the bundle accepts TCP connections on its proxy port at `ip`, from the host."""
    deadline = time.monotonic() + timeout
    while not _tcp_accepts(str(ip), PROXY_PORT):
        container = client.containers.get(container_name)
        if container.status not in {"created", "running"} or time.monotonic() > deadline:
            logs = container.logs(tail=5).decode(errors="replace").strip().replace("\n", " | ")
            why = f"it is {container.status}" if container.status != "running" else f"not within {timeout:.0f} s"
            raise StepFailed(
                "bundle ready",
                f"the bundle did not accept connections on {ip}:{PROXY_PORT} ({why}); "
                f"its last log lines: {logs or '(none)'}",
            )
        time.sleep(0.1)


def bring_up_bundle(
    manifest: Manifest, client: docker.DockerClient, state: StateStore, site: BundleSite, owner: str, undo: Undo,
    on_step: Progress, ready_timeout: float,
) -> None:  # fmt: skip
    """`up`'s bundle steps, the same for every backend: its secrets, its container, and the wait until its
    proxy answers (from the host, on its egress address where it has one)."""
    step("secrets", lambda: write_secrets(manifest, site.bundle_dir, state))
    step("bundle start", lambda: start_bundle(client, site, owner, state, undo))
    on_step("bundle start", f"{site.container_name} at {site.ip}")
    step("bundle ready", lambda: wait_until_ready(client, site.container_name, site.egress_ip or site.ip, ready_timeout))
    on_step("bundle ready", f"proxy answers at http://{site.ip}:{PROXY_PORT}")


@contextmanager
def undone_on_failure(slug: str) -> Iterator[Undo]:
    """Yield an Undo for `up`; on any failure or interrupt, undo it newest first and re-raise, a failed
    step's reason saying what was removed or what is left."""
    undo = Undo()
    try:
        yield undo
    except BaseException as exc:
        left = undo.leftovers(slug)
        if isinstance(exc, StepFailed):
            raise StepFailed(exc.step, f"{exc.reason}; {left or 'what this run created was removed'}") from exc
        raise


def prepare(prepare_parts: Callable[..., Any], manifest: Manifest, client: docker.DockerClient, state: StateStore,
            **options: Any) -> Any:  # fmt: skip
    """A backend's `prepare`: run its `prepare_parts(manifest, client, state, undo, **options)`; if anything
    fails, what this call created is removed again, and what cannot be is named."""
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


def step(name: str, action: Callable[[], Any]) -> Any:
    """Run one step of `up`; errors that are not already a StepFailed are reported under this step's name."""
    try:
        return action()
    except StepFailed:
        raise
    except BottleError as exc:
        raise StepFailed(name, str(exc)) from exc
    except docker.errors.DockerException as exc:
        raise StepFailed(name, f"the Docker Engine failed: {exc}") from exc
    except requests.exceptions.RequestException as exc:
        raise StepFailed(name, f"the Docker Engine stopped answering ({type(exc).__name__})") from exc


# -- down and ls ------------------------------------------------------------------------------------------


def removes_state(state: StateStore, slug: str, backend: str) -> bool:
    """Whether `backend`'s `down` removes the bottle's state directory: its plan is this backend's, or it has
    none, or one that cannot be read (whichever backend gets there removes that)."""
    try:
        return (state.read_plan_data(slug) or {}).get("backend", backend) == backend
    except StateError:
        return True


def saved_plans(state: StateStore, backend: str, plan_type: type[BaseModel]) -> dict[str, Any]:
    """slug -> `backend`'s plan on disk, for every bottle of this backend; None for one that cannot be read."""
    plans: dict[str, Any] = {}
    for slug in state.slugs():
        try:
            data = state.read_plan_data(slug)
            if data and data.get("backend") == backend:
                plans[slug] = plan_type.model_validate(data)
        except (StateError, ValidationError):
            plans[slug] = None
    return plans


def down(
    slug: str, client: docker.DockerClient, state: StateStore, backend: str,
    before: Sequence[tuple[str, Callable[[list[str]], None]]] = (),
) -> list[str]:
    """Remove the bottle's containers, networks and state, whatever of them exists; keep the cache.

    `before` are the backend's own parts (its VM, say), each removed first by a function that appends
    what it removed. Only what this state root owns is touched: docker resources carrying its owner
    label. Every part is attempted even when one fails; the failures are raised together at the end.
    """
    removed: list[str] = []
    failed: list[str] = []
    owner = state.owner()
    selector = {"label": label_filter(labels(slug, backend, owner or "none"))}

    def containers(done: list[str]) -> None:
        for container in client.containers.list(all=True, filters=selector, ignore_removed=True) if owner else []:
            container.remove(force=True)
            done.append(f"container {container.name}")

    def networks(done: list[str]) -> None:
        for network in client.networks.list(filters=selector) if owner else []:
            network.remove()
            done.append(f"network {network.name}")

    def files(done: list[str]) -> None:
        if not removes_state(state, slug, backend):
            return  # another backend's bottle: its own `down` removes its state
        if failed:  # keep what proves the rest is ours, so that `bottle down` can try again
            failed.append(f"state: kept {state.bottle_dir(slug)} until the rest is removed")
        elif (path := state.remove_bottle(slug)) is not None:
            done.append(f"state {path}")

    for part, action in [*before, ("containers", containers), ("network", networks), ("state", files)]:
        try:
            action(removed)
        except (BottleError, docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
            failed.append(f"{part}: {reason(exc)}")
    if failed:
        done = f" (removed: {', '.join(removed)})" if removed else ""
        raise BottleError(f"could not remove all of bottle '{slug}': {'; '.join(failed)}{done}")
    return removed


def bundle_log(client: docker.DockerClient | None, state: StateStore, slug: str, *, follow: bool) -> Iterator[bytes]:
    """The stdout of the bottle's bundle container (its audit log), from whichever backend made it."""
    owner = state.owner()
    wanted = label_filter({LABEL_MANAGED: "true", LABEL_SLUG: slug, LABEL_OWNER: str(owner), LABEL_ROLE: BUNDLE})
    if client is None:
        raise DockerProblem(f"bottle '{slug}' has its bundle on the Docker Engine, which is not reachable")
    found = client.containers.list(all=True, filters={"label": wanted}, ignore_removed=True) if owner else []
    if not found:
        raise UsageError(f"bottle '{slug}' has no bundle made from this state directory; `bottle ls` lists the bottles")
    if len(found) > 1:
        raise BottleError(f"bottle '{slug}' has {len(found)} bundles; `bottle down {slug}` removes them all")
    return found[0].logs(stdout=True, stderr=False, stream=True, follow=follow)


def foreign(backend: str, what: str, why: str, command: str) -> BottleStatus:
    """A resource with bottle's labels that bottle will not touch, named by what it is, not by its labels."""
    return BottleStatus(
        slug="".join(c for c in what.rsplit(" ", 1)[-1] if c.isascii() and c.isprintable())[:80],
        name=None,
        backend=backend,
        address=None,
        parts={},
        drift=[f"{what} {why}; bottle leaves it alone (`{command}` removes it)"],
        foreign=True,
    )


@dataclass
class Found:
    """What `survey_bottles` found of one backend's bottles: parts by slug, plans by slug, and strays."""

    parts: dict[str, dict[str, str]] = field(default_factory=dict)  # slug -> part -> status
    plans: dict[str, Any] = field(default_factory=dict)  # slug -> plan, None for one that cannot be read
    foreign: list[BottleStatus] = field(default_factory=list)

    def add(self, slug: str, part: str, status: str) -> None:
        self.parts.setdefault(slug, {})[part] = status


def survey_bottles(client: docker.DockerClient, state: StateStore, backend: str, plan_type: type[BaseModel]) -> Found:
    """Every docker resource and plan of `backend`'s bottles on this machine.

    A network's part is its role (`network` for the main one), a container's part is its role. A
    resource that carries bottle's labels but is not this state root's (another BOTTLE_HOME's, or a
    container that inherited the labels from its image) is listed as foreign, by its own name: its
    labels never become a slug or a path.
    """
    owner = state.owner()
    found = Found()
    selector = {"label": [LABEL_MANAGED, f"{LABEL_BACKEND}={backend}"]}
    resources = [("network", n, n.attrs.get("Labels") or {}) for n in client.networks.list(filters=selector)]
    containers = client.containers.list(all=True, filters=selector, ignore_removed=True)  # one may go meanwhile
    resources += [("container", c, c.labels or {}) for c in containers]
    for kind, resource, resource_labels in resources:
        slug = owned_slug(resource_labels, backend, owner)
        if slug is None:
            why = f"carries bottle's labels but {why_not_owned(resource_labels, backend, owner)}"
            found.foreign.append(foreign(backend, f"{kind} {resource.name}", why, f"docker {kind} rm {resource.name}"))
        elif kind == "network":
            role = resource_labels.get(LABEL_ROLE)
            found.add(slug, f"{role}-network" if role else "network", "present")
        else:
            found.add(slug, resource_labels.get(LABEL_ROLE) or "container", resource.status)
    found.plans = saved_plans(state, backend, plan_type)
    return found


def statuses(found: Found, backend: str, part_names: list[str], address: Callable[[Any], str]) -> list[BottleStatus]:
    """One BottleStatus per bottle `found`, with every part in `part_names` (missing ones marked so)."""
    result = []
    for slug in sorted(set(found.plans) | set(found.parts)):
        plan = found.plans.get(slug)
        seen = found.parts.get(slug, {})
        parts = {name: seen.get(name, "missing") for name in part_names}
        damaged = slug in found.plans and plan is None
        drift = [f"its plan cannot be read (`bottle down {slug}` removes the bottle)"] if damaged else []
        result.append(
            BottleStatus(
                slug=slug,
                name=slug if damaged else plan.name if plan else None,
                backend=backend,
                address=address(plan) if plan else None,
                parts=parts,
                drift=drift + _drift(parts, has_plan=slug in found.plans),
            )
        )
    return result + found.foreign


def _drift(parts: dict[str, str], *, has_plan: bool) -> list[str]:
    if not has_plan:
        return ["no plan on disk: left over from a crash or removed state (`bottle gc` removes it)"]
    up_parts = {k for k, v in parts.items() if v in {"present", "running"}}
    if not up_parts or len(up_parts) == len(parts):
        return []
    down_parts = sorted(set(parts) - up_parts)
    return [f"{', '.join(down_parts)} not up while {', '.join(sorted(up_parts))} is (`bottle up` repairs it)"]
