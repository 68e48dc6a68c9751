"""Executing a plan: the bundle container, the image archive, the machine, the probe; and taking them down again.

`up` runs its steps in order; each adopts what already exists, and whatever a run created is removed
again, newest first, if a later step fails or the user interrupts it. `down` removes everything a
bottle has by name and label, so it also cleans up after a run that crashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import requests
from docker.models.containers import Container
from pydantic import ValidationError

from bottle.backend import (
    LABEL_BACKEND, LABEL_MANAGED, LABEL_ROLE, BottleStatus, label_filter, labels, owned_slug, why_not_owned,
)  # fmt: skip
from bottle.backends.smolmachines import probe
from bottle.backends.smolmachines.plan import PROXY_PORT, SmolmachinesBottlePlan
from bottle.backends.smolmachines.prepare import BACKEND, prepare_parts, resource_name, secret_name
from bottle.backends.smolmachines.smolvm import Smolvm
from bottle.bundle import SECRETS_FILE
from bottle.bundle.policy import is_header_value
from bottle.errors import BottleError, StateError, StepFailed
from bottle.manifest import Manifest
from bottle.state import StateStore
from bottle.undo import Undo, reason

Progress = Callable[[str, str], None]
LABEL_CONFIG = "bottle.config"  # a digest of what the machine was made from
# The machine's persistent workload: nothing. The agent is the command `up` attaches with `exec`; an
# agent image's own ENTRYPOINT/CMD would otherwise start a second agent in the background.
WORKLOAD = ["sleep", "2147483647"]


def write_secrets(manifest: Manifest, plan: SmolmachinesBottlePlan, state: StateStore) -> None:
    """Read each credential's secret on the host and hand it to the bundle only (0600, never to the VM)."""
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
    state.write_private(plan.bundle_dir / SECRETS_FILE, json.dumps(secrets).encode())


def _tcp_accepts(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=0.5):
            return True
    except OSError:
        return False


def _bundle(client: docker.DockerClient, plan: SmolmachinesBottlePlan, owner: str) -> Container | None:
    try:
        container = client.containers.get(plan.bundle_container_name)
    except docker.errors.NotFound:
        return None
    found = container.labels or {}
    if owned_slug(found, BACKEND, owner) != plan.slug or found.get(LABEL_ROLE) != "bundle":
        raise BottleError(
            f"a container named '{plan.bundle_container_name}' exists but this bottle state directory did not "
            "create it; "
            f"remove it (`docker rm -f {plan.bundle_container_name}`) or rename the bottle"
        )
    return container


def start_bundle(client: docker.DockerClient, plan: SmolmachinesBottlePlan, owner: str, undo: Undo) -> None:
    """Run the bundle at its pinned IP on the bottle's network, config mounted read-only; adopt it if running."""
    container = _bundle(client, plan, owner)
    if container is not None:
        if container.status != "running":
            container.start()
        return
    try:
        client.images.get(plan.bundle_image)  # never pull implicitly: the bundle image is built locally
    except docker.errors.ImageNotFound:
        raise StepFailed(
            "bundle start", f"the bundle image '{plan.bundle_image}' is not on this machine; build or load it first"
        ) from None
    endpoint = client.api.create_endpoint_config(ipv4_address=str(plan.bundle_ip))
    container = client.containers.create(
        plan.bundle_image,
        name=plan.bundle_container_name,
        labels=labels(plan.slug, BACKEND, owner) | {LABEL_ROLE: "bundle"},
        network=plan.network_name,
        networking_config={plan.network_name: endpoint},
        volumes={str(plan.bundle_dir): {"bind": "/etc/bottle", "mode": "ro"}},
        user=f"{os.getuid()}:{os.getgid()}",  # the owner of the 0600 config, CA and secrets it reads
        environment={"HOME": "/tmp"},
        read_only=True,
        tmpfs={"/tmp": "size=64m,mode=1777"},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        restart_policy={"Name": "unless-stopped"},
        # The audit log is the container's stdout: a VM flooding the bundle must not fill the host's disk.
        log_config={"Type": "json-file", "Config": {"max-size": "50m", "max-file": "5"}},
    )
    undo.push(f"container {container.name}", lambda: container.remove(force=True))
    try:
        container.start()
    except docker.errors.APIError as exc:
        raise StepFailed("bundle start", f"docker could not start the bundle: {exc.explanation}") from None


def wait_until_ready(client: docker.DockerClient, plan: SmolmachinesBottlePlan, timeout: float) -> None:
    """Wait until the bundle accepts TCP connections on its proxy port, from the host, as the VM will."""
    deadline = time.monotonic() + timeout
    while not _tcp_accepts(str(plan.bundle_ip), PROXY_PORT):
        container = client.containers.get(plan.bundle_container_name)
        if container.status not in {"created", "running"} or time.monotonic() > deadline:
            logs = container.logs(tail=5).decode(errors="replace").strip().replace("\n", " | ")
            why = f"it is {container.status}" if container.status != "running" else f"not within {timeout:.0f} s"
            raise StepFailed(
                "bundle ready",
                f"the bundle did not accept connections on {plan.bundle_ip}:{PROXY_PORT} ({why}); "
                f"its last log lines: {logs or '(none)'}",
            )
        time.sleep(0.1)


def image_source(client: docker.DockerClient, plan: SmolmachinesBottlePlan, state: StateStore, on_step: Progress) -> str:
    """What smolvm makes the machine from: a local image as a `docker save` archive, cached by image ID;
    a reference docker does not have is passed through for smolvm to pull.

    The archive is written into a fresh private directory and renamed into place, so an interrupted save
    leaves nothing half-written and no planted link is written through.
    """
    try:
        image = client.images.get(plan.agent_image)
    except docker.errors.ImageNotFound:
        on_step("image", f"{plan.agent_image} is not a local image; smolvm pulls it")
        return plan.agent_image
    archive = state.cache_dir() / "images" / f"{image.id.removeprefix('sha256:')}.tar"
    if state.is_file(archive):
        on_step("image", f"reusing {archive}")
        return str(archive)
    on_step("image", f"saving {plan.agent_image} for smolvm")
    cache = state.private_dir(archive.parent)
    try:
        with tempfile.TemporaryDirectory(dir=cache, prefix=".saving-") as scratch:
            partial = Path(scratch) / archive.name
            with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                for chunk in image.save(named=True):
                    out.write(chunk)
            os.replace(partial, archive)
    except OSError as exc:
        raise StateError(f"cannot store the image archive at {archive}: {exc.strerror or exc}") from None
    return str(archive)


def machine_config(state: StateStore, plan: SmolmachinesBottlePlan, image: str) -> str:
    """A digest of everything the machine is made from; a machine whose label differs is made anew."""
    made_from = [state.read(plan.smolfile_path) or b"", image.encode(), str(plan.bundle_ip).encode(),
                 json.dumps(WORKLOAD).encode()]  # fmt: skip
    return hashlib.sha256(b"\0".join(made_from)).hexdigest()[:32]


def ensure_machine(
    smolvm: Smolvm, plan: SmolmachinesBottlePlan, state: StateStore, owner: str, image: str, undo: Undo,
    on_step: Progress,
) -> None:
    """Create the machine from the image and the Smolfile, labelled as this state directory's; start it.

    A machine of that name is adopted only if it carries this state directory's labels and was made
    from exactly what the plan says; one of ours that differs is made anew, and anyone else's is refused.
    Before starting it, bottle reads back what smolvm recorded and refuses a machine that is not exactly
    what bottle makes (`check_recorded`).
    """
    name = plan.machine_name
    config = machine_config(state, plan, image)
    existing = smolvm.machines().get(name)
    if existing is not None and owned_slug(existing.get("labels"), BACKEND, owner) != plan.slug:
        raise BottleError(
            f"a smolvm machine named '{name}' exists but this bottle state directory did not create it; "
            f"remove it (`smolvm machine delete --name {name} --force`) or rename the bottle"
        )
    if existing is not None and (existing.get("state") != "running" or existing["labels"].get(LABEL_CONFIG) != config):
        # smolvm does not report everything a machine was made with (its denies, UDP or socket
        # options), so a stopped machine is never trusted: making it anew costs a fraction of a second.
        on_step("machine create", f"{name} is not running or differs from the plan; making it anew")
        smolvm.delete(name)
        existing = None
    if existing is None:
        on_step("machine create", f"{name}, allowed to reach {plan.allow_cidr} only")
        made_labels = labels(plan.slug, BACKEND, owner) | {LABEL_CONFIG: config}
        flags = ["--dns", str(plan.bundle_ip)]  # the guest's resolver is the bundle, which refuses every query
        smolvm.create(name, image, plan.smolfile_path, labels=made_labels, flags=flags, command=WORKLOAD)
        undo.push(f"machine {name}", lambda: smolvm.delete(name))
    check_recorded(existing or smolvm.machines().get(name) or {}, plan)
    if existing is None or existing.get("state") != "running":
        on_step("machine start", name)
        smolvm.start(name)


def check_recorded(machine: dict[str, Any], plan: SmolmachinesBottlePlan) -> None:
    """Refuse a machine smolvm did not record exactly as bottle makes it: the bundle's /32 alone, the
    bundle as resolver, one mount (the CA), no published port or extra disk, GPU off, the inert workload."""
    wanted = {"allowed_cidrs": [plan.allow_cidr], "dns": str(plan.bundle_ip), "mounts": 1, "ports": 0,
              "cmd": WORKLOAD, "gpu": False, "cuda": False}  # fmt: skip
    found = {key: machine.get(key) for key in wanted}
    if found != wanted or machine.get("disks"):
        differs = ", ".join(f"{k}={found[k]!r}" for k in wanted if found[k] != wanted[k]) or "extra disks"
        raise StepFailed(
            "machine create",
            f"smolvm recorded machine {plan.machine_name} with {differs}, not as bottle made it; "
            "bottle will not run an agent in a VM it cannot show is confined to its bundle",
        )


def _step(name: str, action: Callable[[], Any]) -> Any:
    """Run one step; errors that are not already a StepFailed are reported under this step's name."""
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


def up(
    manifest: Manifest,
    client: docker.DockerClient,
    state: StateStore,
    smolvm: Smolvm,
    *,
    prepare_options: dict[str, Any],
    on_step: Progress,
    ready_timeout: float = 30.0,
    probe_timeout: float = 60.0,
) -> SmolmachinesBottlePlan:
    """Bring the bottle up, or adopt the parts that are already up; undo this run's work on any failure."""
    undo = Undo()
    try:
        plan = _step("network", lambda: prepare_parts(manifest, client, state, undo, **prepare_options))
        owner = state.owner(create=True)
        on_step("network", f"{plan.network_name} {plan.bundle_subnet}")
        _step("secrets", lambda: write_secrets(manifest, plan, state))
        _step("bundle start", lambda: start_bundle(client, plan, owner, undo))
        on_step("bundle start", f"{plan.bundle_container_name} at {plan.bundle_ip}")
        _step("bundle ready", lambda: wait_until_ready(client, plan, ready_timeout))
        on_step("bundle ready", f"proxy answers at {plan.proxy_url}")
        image = _step("image", lambda: image_source(client, plan, state, on_step))
        _step("machine", lambda: ensure_machine(smolvm, plan, state, owner, image, undo, on_step))
        _step("probe", lambda: probe.confined(smolvm, plan, timeout=probe_timeout))
        on_step("probe", f"{plan.machine_name} reaches its bundle and nothing else it was tried on")
    except BaseException as exc:
        left = undo.leftovers(manifest.slug)
        if isinstance(exc, StepFailed):
            raise StepFailed(exc.step, f"{exc.reason}; {left or 'what this run created was removed'}") from exc
        raise
    return plan


def down(slug: str, client: docker.DockerClient, state: StateStore, smolvm: Smolvm | None) -> list[str]:
    """Remove the bottle's machine, bundle, network and state, whatever of them exists; keep the cache.

    Only what this state root owns is touched: docker resources carrying its owner label, and the
    machine its plan names. Every part is attempted even when one fails; the failures are raised
    together at the end.
    """
    removed: list[str] = []
    failed: list[str] = []
    name = resource_name(slug)
    owner = state.owner()
    selector = {"label": label_filter(labels(slug, BACKEND, owner or "none"))}

    def machine() -> None:
        if smolvm is not None and smolvm.installed and (found := smolvm.machines().get(name)) is not None:
            if owned_slug(found.get("labels"), BACKEND, owner) == slug and smolvm.delete(name):
                removed.append(f"machine {name}")

    def containers() -> None:
        for container in client.containers.list(all=True, filters=selector) if owner else []:
            container.remove(force=True)
            removed.append(f"container {container.name}")

    def networks() -> None:
        for network in client.networks.list(filters=selector) if owner else []:
            network.remove()
            removed.append(f"network {network.name}")

    def files() -> None:
        if failed:  # keep what proves the rest is ours, so that `bottle down` can try again
            failed.append(f"state: kept {state.bottle_dir(slug)} until the rest is removed")
        elif (path := state.remove_bottle(slug)) is not None:
            removed.append(f"state {path}")

    for part, action in [("machine", machine), ("bundle", containers), ("network", networks), ("state", files)]:
        try:
            action()
        except (BottleError, docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
            failed.append(f"{part}: {reason(exc)}")
    if failed:
        done = f" (removed: {', '.join(removed)})" if removed else ""
        raise BottleError(f"could not remove all of bottle '{slug}': {'; '.join(failed)}{done}")
    return removed


def inventory(client: docker.DockerClient, state: StateStore, smolvm: Smolvm | None) -> list[BottleStatus]:
    """Every smolmachines bottle this machine has a trace of: on disk, in docker, or in smolvm.

    A resource that carries bottle's labels but is not this state root's (another BOTTLE_HOME's, or a
    container that inherited the labels from its image) is listed as foreign, by its own name: its
    labels never become a slug or a path.
    """
    owner = state.owner()
    selector = {"label": [LABEL_MANAGED, f"{LABEL_BACKEND}={BACKEND}"]}
    networks: dict[str, Any] = {}
    bundles: dict[str, Any] = {}
    foreign: list[BottleStatus] = []
    found = [("network", n, n.attrs.get("Labels")) for n in client.networks.list(filters=selector)]
    found += [("container", c, c.labels) for c in client.containers.list(all=True, filters=selector)]
    for kind, resource, resource_labels in found:
        slug = owned_slug(resource_labels, BACKEND, owner)
        if slug is None:
            why = f"carries bottle's labels but {why_not_owned(resource_labels, BACKEND, owner)}"
            foreign.append(_foreign(f"{kind} {resource.name}", why, f"docker {kind} rm {resource.name}"))
        else:
            (networks if kind == "network" else bundles)[slug] = resource
    plans: dict[str, SmolmachinesBottlePlan | None] = {}  # None: a plan that cannot be read
    for slug in state.slugs():
        try:
            data = state.read_plan_data(slug)
            if data and data.get("backend") == BACKEND:
                plans[slug] = SmolmachinesBottlePlan.model_validate(data)
        except (StateError, ValidationError):
            plans[slug] = None
    machines = {}
    for name, machine in (smolvm.machines() if smolvm is not None and smolvm.installed else {}).items():
        found_labels = machine.get("labels") or {}
        slug = owned_slug(found_labels, BACKEND, owner)
        if slug is not None and name == resource_name(slug):
            machines[slug] = machine
        elif name.startswith("bottle-") or found_labels.get(LABEL_MANAGED):
            why = f"carries bottle's name or labels but {why_not_owned(found_labels, BACKEND, owner) or 'not its name'}"
            foreign.append(_foreign(f"smolvm machine {name}", why, f"smolvm machine delete --name {name} --force"))
    result = []
    for slug in sorted(set(plans) | set(networks) | set(bundles) | set(machines)):
        plan = plans.get(slug)
        parts = {
            "network": "present" if slug in networks else "missing",
            "bundle": bundles[slug].status if slug in bundles else "missing",
            "machine": machines[slug].get("state", "unknown") if slug in machines else "missing",
        }
        damaged = slug in plans and plan is None
        drift = [f"its plan cannot be read (`bottle down {slug}` removes the bottle)"] if damaged else []
        result.append(
            BottleStatus(
                slug=slug,
                name=slug if damaged else plan.name if plan else None,
                backend=BACKEND,
                address=str(plan.bundle_ip) if plan else None,
                parts=parts,
                drift=drift + _drift(parts, has_plan=slug in plans),
            )
        )
    return result + foreign


def _foreign(what: str, why: str, command: str) -> BottleStatus:
    """A resource with bottle's labels that bottle will not touch, named by what it is, not by its labels."""
    return BottleStatus(
        slug="".join(c for c in what.rsplit(" ", 1)[-1] if c.isascii() and c.isprintable())[:80],
        name=None,
        backend=BACKEND,
        address=None,
        parts={},
        drift=[f"{what} {why}; bottle leaves it alone (`{command}` removes it)"],
        foreign=True,
    )


def _drift(parts: dict[str, str], *, has_plan: bool) -> list[str]:
    if not has_plan:
        return ["no plan on disk: left over from a crash or removed state (`bottle gc` removes it)"]
    up_parts = {k for k, v in parts.items() if v in {"present", "running"}}
    if not up_parts or len(up_parts) == len(parts):
        return []
    down_parts = sorted(set(parts) - up_parts)
    return [f"{', '.join(down_parts)} not up while {', '.join(sorted(up_parts))} is (`bottle up` repairs it)"]
