"""Executing a plan: the bundle container, the image archive, the machine, the probe; and taking them down again.

`up` runs its steps in order; each adopts what already exists, and whatever a run created is removed
again, newest first, if a later step fails or the user interrupts it. `down` removes everything a
bottle has by name and label, so it also cleans up after a run that crashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import docker

from bottle import sidecar
from bottle.backend import LABEL_MANAGED, BottleStatus, labels, owned_slug, why_not_owned
from bottle.backends.smolmachines import probe
from bottle.backends.smolmachines.plan import SmolmachinesBottlePlan
from bottle.backends.smolmachines.prepare import BACKEND, prepare_parts
from bottle.backends.smolmachines.smolvm import Smolvm
from bottle.errors import BottleError, StateError, StepFailed
from bottle.manifest import Manifest
from bottle.sidecar import LABEL_CONFIG, Progress, resource_name, step
from bottle.state import StateStore
from bottle.undo import Undo

# The machine's persistent workload: nothing. The agent is the command `up` attaches with `exec`; an
# agent image's own ENTRYPOINT/CMD would otherwise start a second agent in the background.
WORKLOAD = ["sleep", "2147483647"]


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
    with sidecar.undone_on_failure(manifest.slug) as undo:
        plan = step("network", lambda: prepare_parts(manifest, client, state, undo, **prepare_options))
        owner = state.owner(create=True)
        on_step("network", f"{plan.network_name} {plan.bundle_subnet}")
        sidecar.bring_up_bundle(manifest, client, state, plan.site, owner, undo, on_step, ready_timeout)
        image = step("image", lambda: image_source(client, plan, state, on_step))
        step("machine", lambda: ensure_machine(smolvm, plan, state, owner, image, undo, on_step))
        step("probe", lambda: probe.confined(smolvm, plan, timeout=probe_timeout))
        on_step("probe", f"{plan.machine_name} reaches its bundle and nothing else it was tried on")
    return plan


def down(slug: str, client: docker.DockerClient, state: StateStore, smolvm: Smolvm | None) -> list[str]:
    """Remove the bottle's machine, then its bundle, network and state, whatever of them exists.

    The machine is touched only if it carries this state root's owner labels; see `sidecar.down`.
    """
    name = resource_name(slug)
    owner = state.owner()

    def machine(removed: list[str]) -> None:
        if smolvm is not None and smolvm.installed and (found := smolvm.machines().get(name)) is not None:
            if owned_slug(found.get("labels"), BACKEND, owner) == slug and smolvm.delete(name):
                removed.append(f"machine {name}")

    return sidecar.down(slug, client, state, BACKEND, before=[("machine", machine)])


def inventory(client: docker.DockerClient, state: StateStore, smolvm: Smolvm | None) -> list[BottleStatus]:
    """Every smolmachines bottle this machine has a trace of: on disk, in docker, or in smolvm."""
    owner = state.owner()
    found = sidecar.survey_bottles(client, state, BACKEND, SmolmachinesBottlePlan)
    for name, machine in (smolvm.machines() if smolvm is not None and smolvm.installed else {}).items():
        found_labels = machine.get("labels") or {}
        slug = owned_slug(found_labels, BACKEND, owner)
        if slug is not None and name == resource_name(slug):
            found.add(slug, "machine", machine.get("state", "unknown"))
        elif name.startswith("bottle-") or found_labels.get(LABEL_MANAGED):
            why = f"carries bottle's name or labels but {why_not_owned(found_labels, BACKEND, owner) or 'not its name'}"
            found.foreign.append(
                sidecar.foreign(BACKEND, f"smolvm machine {name}", why, f"smolvm machine delete --name {name} --force")
            )
    return sidecar.statuses(found, BACKEND, ["network", "bundle", "machine"], lambda plan: str(plan.bundle_ip))
