"""Executing a plan: the bundle container, the packed artifact, the machine; and taking them down again.

`up` runs its steps in order; each adopts what already exists, and whatever a run created is removed
again, newest first, if a later step fails or the user interrupts it. `down` removes everything a
bottle has by name and label, so it also cleans up after a run that crashed.
"""

from __future__ import annotations

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
from bottle.backends.smolmachines import smolfile
from bottle.backends.smolmachines.plan import PROXY_PORT, SmolmachinesBottlePlan
from bottle.backends.smolmachines.prepare import BACKEND, GUEST_DIR, prepare_parts, resource_name, secret_name
from bottle.backends.smolmachines.smolvm import Smolvm
from bottle.bundle import SECRETS_FILE
from bottle.bundle.policy import is_header_value
from bottle.errors import BottleError, StateError, StepFailed
from bottle.manifest import Manifest, is_slug
from bottle.state import StateStore
from bottle.undo import Undo, reason

Progress = Callable[[str, str], None]


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


def ensure_artifact(
    smolvm: Smolvm, plan: SmolmachinesBottlePlan, state: StateStore, *, repack: bool, on_step: Progress
) -> None:
    """Pack the agent image once per image (and smolvm version); reuse the cached .smolmachine after that.

    smolvm packs into a fresh private directory with an unpredictable name, and the artifact is renamed
    into place, so an interrupted pack leaves nothing half-written and no planted link is written through.
    """
    stamp_path = plan.artifact_path.with_suffix(".json")
    stamp = json.dumps({"image": plan.agent_image, "smolvm_version": plan.smolvm_version}).encode()
    if not repack and state.is_file(plan.artifact_path) and state.read(stamp_path) == stamp:
        on_step("pack", f"reusing {plan.artifact_path}")
        return
    cache = state.private_dir(plan.artifact_path.parent)
    on_step("pack", f"packing {plan.agent_image} (this can take minutes)")
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(dir=cache, prefix=".packing-") as scratch:
            partial = Path(scratch) / plan.artifact_path.name
            smolvm.pack(plan.agent_image, partial)
            os.chmod(partial, 0o600)  # smolvm made it under its own umask
            os.replace(partial, plan.artifact_path)
    except OSError as exc:
        raise StateError(f"cannot store the packed image at {plan.artifact_path}: {exc.strerror or exc}") from None
    state.write_private(stamp_path, stamp)
    on_step("pack", f"packed in {time.monotonic() - started:.0f} s")


def machine_record(state: StateStore, slug: str) -> Path:
    """Where this state directory notes the machines it made: outside the bottle's own directory, so a
    machine is still known as ours after that directory is lost."""
    return state.root / "machines" / f"{slug}.json"


def read_record(state: StateStore, slug: str) -> dict[str, Any] | None:
    try:
        data = json.loads(state.read(machine_record(state, slug)) or b"null")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def ensure_machine(
    smolvm: Smolvm, plan: SmolmachinesBottlePlan, state: StateStore, undo: Undo, on_step: Progress
) -> None:
    """Create the machine from the artifact with exactly the Smolfile's env and one CIDR; start it.

    A machine of that name is adopted only if this state directory made it (its record matches) with
    exactly the plan's env and allowlist; one of ours that differs (the network moved, the env changed)
    is made anew, and anyone else's is refused.
    """
    data = smolfile.build(plan.agent_env, plan.bundle_ip)
    wanted = {"env": data["env"], "allow_cidrs": data["network"]["allow_cidrs"]}
    record = read_record(state, plan.slug)
    existing = smolvm.machines().get(plan.machine_name)
    if existing is not None and not _owns_machine(existing, plan.slug, state.owner(), record):
        raise BottleError(
            f"a smolvm machine named '{plan.machine_name}' exists but this bottle state directory did not create "
            f"it; remove it (`smolvm machine delete {plan.machine_name} --force`) or rename the bottle"
        )
    if existing is not None and {k: (record or {}).get(k) for k in wanted} != wanted:
        on_step("machine create", f"{plan.machine_name} differs from the plan; making it anew")
        smolvm.delete(plan.machine_name)
        existing = None
    if existing is None:
        on_step("machine create", f"{plan.machine_name}, allowed to reach {plan.allow_cidr} only")
        guest = ["--volume", f"{plan.guest_dir}:{GUEST_DIR}:ro"]  # the bundle's CA certificate, nothing else
        smolvm.create(plan.machine_name, plan.artifact_path, smolfile.flags(data) + guest)
        undo.push(f"machine {plan.machine_name}", lambda: _delete_machine(smolvm, state, plan.slug))
        made = smolvm.machines().get(plan.machine_name) or {}
        record = wanted | {"created_at": made.get("created_at")}
        state.write_private(machine_record(state, plan.slug), json.dumps(record).encode())
    if existing is None or existing.get("state") != "running":
        on_step("machine start", plan.machine_name)
        smolvm.start(plan.machine_name)


def _delete_machine(smolvm: Smolvm, state: StateStore, slug: str) -> None:
    smolvm.delete(resource_name(slug))
    try:
        state.remove_file(machine_record(state, slug))
    except StateError:
        pass  # a record of a machine that is gone matches no other machine (its creation time differs)


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
    repack: bool = False,
    ready_timeout: float = 30.0,
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
        _step("pack", lambda: ensure_artifact(smolvm, plan, state, repack=repack, on_step=on_step))
        _step("machine", lambda: ensure_machine(smolvm, plan, state, undo, on_step))
        _step("exec", lambda: smolvm.probe(plan.machine_name))
        on_step("exec", f"{plan.machine_name} runs commands")
    except BaseException as exc:
        left = undo.leftovers(manifest.slug)
        if isinstance(exc, StepFailed):
            raise StepFailed(exc.step, f"{exc.reason}; {left or 'what this run created was removed'}") from exc
        raise
    return plan


def _owns_machine(machine: dict[str, Any], slug: str, owner: str | None, record: dict[str, Any] | None) -> bool:
    """A smolvm machine is this state directory's if it carries the owner's labels, or if this state
    directory recorded making it (same creation time).

    smolvm keeps one list of machines per user, shared by every BOTTLE_HOME, so a name proves nothing.
    """
    if owned_slug(machine.get("labels"), BACKEND, owner) == slug:
        return True
    made = (record or {}).get("created_at")
    return made is not None and machine.get("created_at") == made


def down(slug: str, client: docker.DockerClient, state: StateStore, smolvm: Smolvm) -> list[str]:
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
        if smolvm.installed and (found := smolvm.machines().get(name)) is not None:
            if _owns_machine(found, slug, owner, read_record(state, slug)):
                _delete_machine(smolvm, state, slug)
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


def inventory(client: docker.DockerClient, state: StateStore, smolvm: Smolvm) -> list[BottleStatus]:
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
    for name, machine in (smolvm.machines() if smolvm.installed else {}).items():
        slug = name.removeprefix("bottle-")
        if not name.startswith("bottle-"):
            continue
        if is_slug(slug) and _owns_machine(machine, slug, owner, read_record(state, slug)):
            machines[slug] = machine
        else:
            why = "is named like a bottle's but this state directory has no record of making it"
            foreign.append(_foreign(f"smolvm machine {name}", why, f"smolvm machine delete {name} --force"))
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
