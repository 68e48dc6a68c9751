"""The docker backend's steps: two networks, the bundle between them, and the agent's hardened container.

The agent's container is attached to one network, `bottle-<slug>`: `internal` (docker gives it no route
out) and with no address of the host's on it (`inhibit_ipv4`), so the only other thing it can reach is
the bundle at its pinned IP; and with docker's default route removed (`drop_default_route`), so not even
a broadcast leaves its /24. The bundle also sits on `bottle-<slug>-egress`, an ordinary bridge that is
its way out. The container's main process is inert; the agent is the command `attach` runs in it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import docker
from docker.models.containers import Container

from bottle import sidecar
from bottle.backend import LABEL_ROLE, BottleStatus, labels
from bottle.backends.docker.plan import DockerBottlePlan
from bottle.bundle import noroute
from bottle.errors import BottleError, EnvironmentProblem, StepFailed
from bottle.manifest import Manifest
from bottle.sidecar import BUNDLE, LABEL_CONFIG, NetworkSpec, Progress, resource_name, step
from bottle.state import PLAN_FILE, StateStore
from bottle.undo import Undo

BACKEND = "docker"
AGENT = "agent"  # the agent container's role label
WORKDIR = "/workspace"
# The container's main process: nothing, under docker's init (which reaps what the agent leaves behind).
WORKLOAD = ["sleep", "2147483647"]
NOBODY = "65534:65534"
CLONE_NEWUSER, AF_VSOCK = 0x10000000, 40
EPERM, ENOSYS, EAFNOSUPPORT = 1, 38, 97


def _deny(names: list[str], errno: int, *args: dict[str, int | str]) -> dict[str, Any]:
    return {"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": errno, "args": list(args)}


# The agent's seccomp profile. It replaces the Engine's default, which is an allowlist bottle cannot
# extend (some Engines, this project's CI among them, let containers open AF_VSOCK sockets, a way to the
# hypervisor that no network namespace or bundle sees). Everything is allowed but what an unprivileged
# process can still reach that matters here: vsock; new user namespaces (and clone3, whose flags seccomp
# cannot read: ENOSYS makes libc fall back to clone); the kernel keyring, BPF, perf events, userfaultfd
# and io_uring. What needs a capability stays shut by dropping them all. No `architectures`: the native
# one alone, so a 32-bit syscall (and socketcall, which hides socket's family) is killed outright.
SECCOMP = json.dumps({
    "defaultAction": "SCMP_ACT_ALLOW",
    "syscalls": [
        _deny(["socket", "socketpair"], EAFNOSUPPORT, {"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_EQ"}),
        *(_deny([name], EPERM, {"index": 0, "value": CLONE_NEWUSER, "valueTwo": CLONE_NEWUSER,
                                "op": "SCMP_CMP_MASKED_EQ"}) for name in ("unshare", "clone")),  # fmt: skip
        _deny(["clone3"], ENOSYS),
        _deny(["keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
               "io_uring_enter", "io_uring_register"], EPERM),  # fmt: skip
    ],
})
# No address of the host's on the agent's network: an internal bridge otherwise carries the gateway IP
# on the host, where every service listening on 0.0.0.0 answers the agent.
INTERNAL_OPTIONS = {"com.docker.network.bridge.inhibit_ipv4": "true"}


def network_specs(slug: str) -> tuple[NetworkSpec, NetworkSpec]:
    """The agent's network (shared with the bundle alone) and the bundle's egress network."""
    agent = NetworkSpec(
        backend=BACKEND, slug=slug, name=resource_name(slug), key=slug, internal=True, options=INTERNAL_OPTIONS,
        members=frozenset({BUNDLE, AGENT}),
    )  # fmt: skip
    egress = NetworkSpec(backend=BACKEND, slug=slug, name=f"{resource_name(slug)}-egress", key=f"{slug}-egress",
                         role="egress")  # fmt: skip
    return agent, egress


def build_plan(
    manifest: Manifest, state: StateStore, addresses: tuple[Any, Any], ids: tuple[str | None, str | None]
) -> DockerBottlePlan:
    """Assemble the plan from decisions already made; pure."""
    slug = manifest.slug
    (inside, out), (inside_id, out_id) = addresses, ids
    agent, egress = network_specs(slug)
    workspace = manifest.docker.workspace
    return DockerBottlePlan(
        name=manifest.name,
        slug=slug,
        network_name=agent.name,
        network_id=inside_id,
        bundle_subnet=inside.subnet,
        bundle_ip=inside.bundle_ip,
        egress_network_name=egress.name,
        egress_network_id=out_id,
        egress_subnet=out.subnet,
        egress_ip=out.bundle_ip,
        bundle_container_name=sidecar.bundle_name(slug),
        bundle_image=manifest.bundle.image,
        bundle_dir=state.bottle_dir(slug) / "bundle",
        guest_dir=state.bottle_dir(slug) / "guest",
        agent_container_name=f"{resource_name(slug)}-agent",
        agent_image=manifest.agent.image,
        agent_command=manifest.agent.command,
        agent_env=sidecar.agent_env(manifest.agent.env | sidecar.placeholders(manifest), inside.bundle_ip),
        runtime=manifest.docker.runtime,
        memory=manifest.docker.memory,
        cpus=manifest.docker.cpus,
        pids=manifest.docker.pids,
        user=manifest.docker.user,
        workspace=Path(workspace).expanduser().absolute() if workspace else None,
    )


def plan(
    manifest: Manifest, client: docker.DockerClient, state: StateStore, *, pool: IPv4Network, routes: list[IPv4Network]
) -> DockerBottlePlan:
    """The plan `prepare` would make now; only lists docker networks."""
    agent, egress = network_specs(manifest.slug)
    owner = state.owner()
    inside, inside_id = sidecar.planned_addresses(client, agent, owner, pool, routes)
    out, out_id = sidecar.planned_addresses(client, egress, owner, pool, routes, also_taken=[inside.subnet])
    return build_plan(manifest, state, (inside, out), (inside_id, out_id))


def prepare_parts(
    manifest: Manifest, client: docker.DockerClient, state: StateStore, undo: Undo, *, pool: IPv4Network,
    routes: list[IPv4Network],
) -> DockerBottlePlan:  # fmt: skip
    """Do `prepare` and save the plan; push onto `undo` how to remove what this call created."""
    slug = manifest.slug
    if state.read(state.bottle_dir(slug) / PLAN_FILE) is None:
        undo.push(f"state {state.bottle_dir(slug)}", lambda: state.remove_bottle(slug))
    owner = state.owner(create=True)
    agent, egress = (sidecar.ensure_network(client, spec, owner, pool, routes, undo) for spec in network_specs(slug))
    inside, out = sidecar.adopted_addresses(agent), sidecar.adopted_addresses(egress)
    options = agent.attrs.get("Options") or {}
    if agent.attrs.get("Internal") is not True or any(options.get(k) != v for k, v in INTERNAL_OPTIONS.items()):
        raise BottleError(f"docker network {agent.name} is not internal, or gives the host an address on it; "
                          f"remove it (`bottle down {slug}`) and try again")  # fmt: skip
    result = build_plan(manifest, state, (inside, out), (agent.id, egress.id))
    # The proxy serves the agent's network alone: a host user reaching the bundle's egress address is refused.
    sidecar.write_bundle_files(manifest, state, result.bundle_dir, result.guest_dir, [inside.subnet, out.subnet],
                               clients=[inside.subnet])  # fmt: skip
    state.save_plan(result)
    return result


def prepare(manifest: Manifest, client: docker.DockerClient, state: StateStore, **options: Any) -> DockerBottlePlan:
    """Create the bottle's networks (or adopt them), write its bundle config and CA, save its plan."""
    return sidecar.prepare(prepare_parts, manifest, client, state, **options)


def ensure_image(client: docker.DockerClient, image: str) -> Any:
    """The agent's image, which must be on this machine: bottle never pulls behind your back."""
    try:
        return client.images.get(image)
    except docker.errors.ImageNotFound:
        raise StepFailed(
            "agent", f"the agent image '{image}' is not on this machine; `docker pull` it or build it first"
        ) from None


def is_unprivileged(user: str) -> bool:
    """Whether `user` is an ASCII-numeric uid:gid with neither 0 (a name, or digits docker does not read
    as a number, such as '١٢', is looked up in the image's passwd, where it can be root)."""
    found = re.fullmatch(r"([0-9]{1,10}):([0-9]{1,10})", user, re.ASCII)
    return found is not None and all(0 < int(part) < 2**31 for part in found.groups())


def agent_user(plan: DockerBottlePlan, image: Any) -> str:
    """Who the agent runs as, always a numeric uid:gid that is not root's: the manifest's; else yours
    (when you are not root), so files in the workspace are yours; else the image's own if it is one;
    else nobody's."""
    if plan.user:
        return plan.user
    if os.getuid() != 0 and os.getgid() != 0:
        return f"{os.getuid()}:{os.getgid()}"
    user = (image.attrs.get("Config") or {}).get("User") or ""
    return user if is_unprivileged(user) else NOBODY


def agent_container_spec(plan: DockerBottlePlan, user: str, owner: str) -> dict[str, Any]:
    """Everything the agent's container is created with: one internal network, nothing of the host's."""
    env = {"HOME": WORKDIR} | plan.agent_env  # a read-only root leaves the workspace as the one home
    if plan.workspace is not None:
        workspace = {"volumes": {str(plan.workspace): {"bind": WORKDIR, "mode": "rw"}}, "tmpfs": {}}
    else:
        workspace = {"volumes": {}, "tmpfs": {WORKDIR: "size=1g,mode=1777"}}
    spec: dict[str, Any] = {
        "image": plan.agent_image,
        "name": plan.agent_container_name,
        "entrypoint": WORKLOAD[:1],
        "command": WORKLOAD[1:],
        "labels": labels(plan.slug, BACKEND, owner) | {LABEL_ROLE: AGENT},
        "environment": env,
        "user": user,  # (no working_dir: docker would make /workspace 0755 under the tmpfs; exec sets it)
        "network": plan.network_name,
        "dns": [str(plan.bundle_ip)],  # the bundle refuses every query and logs it
        "volumes": {str(plan.guest_dir / "ca.pem"): {"bind": sidecar.GUEST_CA_PATH, "mode": "ro"}}
        | workspace["volumes"],
        "tmpfs": {"/tmp": "size=512m,mode=1777"} | workspace["tmpfs"],
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges", f"seccomp={SECCOMP}"],
        "sysctls": {"net.ipv6.conf.all.disable_ipv6": "1"},  # the bundle is IPv4; no link-local paths either
        "ipc_mode": "private",
        "init": True,
        "pids_limit": plan.pids,
        "mem_limit": plan.memory,
        "memswap_limit": plan.memory,
        "nano_cpus": int(plan.cpus * 1e9),
        "runtime": plan.runtime,
        "log_config": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}},
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]
    spec["labels"] = spec["labels"] | {LABEL_CONFIG: digest}
    return spec


def ensure_agent(client: docker.DockerClient, plan: DockerBottlePlan, owner: str, undo: Undo, on_step: Progress) -> None:
    """Run the agent's container; adopt it only if it runs and was made from exactly this plan."""
    image = ensure_image(client, plan.agent_image)
    if plan.runtime is not None and plan.runtime not in (client.info().get("Runtimes") or {}):
        raise StepFailed("agent", f"the Docker Engine has no runtime named '{plan.runtime}'; register it in the "
                                  "Engine's daemon.json (`bottle doctor` lists the registered ones)")  # fmt: skip
    if plan.workspace is not None and not plan.workspace.is_dir():
        raise StepFailed("agent", f"the workspace {plan.workspace} is not a directory; create it or fix "
                                  "[docker] workspace")  # fmt: skip
    shut_host_off(client, plan, owner)  # before the agent runs: every start, since a new bridge forgets it
    spec = agent_container_spec(plan, agent_user(plan, image), owner)
    found = sidecar.find_container(client, plan.agent_container_name, BACKEND, plan.slug, AGENT, owner)
    if found is not None:
        if found.status == "running" and found.labels.get(LABEL_CONFIG) == spec["labels"][LABEL_CONFIG]:
            drop_default_route(client, plan, found, owner)  # again: a restart by hand would have restored it
            return
        on_step("agent", f"{found.name} is not running or differs from the plan; making it anew")
        found.remove(force=True)
    container: Container = client.containers.create(**spec)
    undo.push(f"container {container.name}", lambda: container.remove(force=True))
    try:
        container.start()
    except docker.errors.APIError as exc:
        raise StepFailed("agent", f"docker could not start the agent's container: {exc.explanation}") from None
    drop_default_route(client, plan, container, owner)


def one_shot(client: docker.DockerClient, plan: DockerBottlePlan, owner: str, command: list[str], doing: str,
             unmasked: bool = False, **options: Any) -> None:  # fmt: skip
    """Run one of the bundle image's jobs (bottle.bundle.noroute) in a container that is gone afterwards.

    `unmasked` leaves /proc writable (what the CLI calls `systempaths=unconfined`), for a job that sets a
    sysctl with no more than its capabilities allow.
    """
    host = client.api.create_host_config(read_only=True, **options)
    if unmasked:
        host |= {"MaskedPaths": [], "ReadonlyPaths": []}
    created = client.api.create_container(
        plan.bundle_image, command, user="0", host_config=host,
        labels=labels(plan.slug, BACKEND, owner) | {LABEL_ROLE: "helper"},
    )  # fmt: skip
    helper = client.containers.get(created["Id"])
    try:
        helper.start()
        code = helper.wait(timeout=60)["StatusCode"]
        said = helper.logs(stdout=False, stderr=True).decode(errors="replace").strip().splitlines() if code else []
    finally:
        helper.remove(force=True)
    if code:
        raise StepFailed("agent", f"could not {doing}: {said[-1] if said else f'exit {code}'}")


def drop_default_route(client: docker.DockerClient, plan: DockerBottlePlan, agent: Container, owner: str) -> None:
    """Remove the default route docker gives the agent, from a one-shot container of the bundle image that
    joins the agent's network namespace with CAP_NET_ADMIN alone."""
    one_shot(client, plan, owner, ["noroute"], "remove the agent's default route",
             network_mode=f"container:{agent.id}", cap_drop=["ALL"], cap_add=["NET_ADMIN"],
             security_opt=["no-new-privileges"])  # fmt: skip


def shut_host_off(client: docker.DockerClient, plan: DockerBottlePlan, owner: str) -> None:
    """Have the host's stack drop everything the agent sends it (rp_filter on the agent's bridge; see
    bottle.bundle.noroute): directly when bottle is root beside the Engine, else from a one-shot container
    of the bundle image on the host's network, as anyone who may use the Engine can run."""
    network = client.networks.get(plan.network_id or plan.network_name)
    bridge = (network.attrs.get("Options") or {}).get("com.docker.network.bridge.name") or f"br-{network.id[:12]}"
    if os.geteuid() == 0 and noroute.rp_filter(bridge) is None:
        return
    # CAP_NET_ADMIN alone, with /proc/sys left writable (systempaths=unconfined): not --privileged.
    one_shot(client, plan, owner, ["rpfilter", bridge], f"turn on reverse-path filtering for {bridge}",
             unmasked=True, network_mode="host", cap_drop=["ALL"], cap_add=["NET_ADMIN"],
             security_opt=["no-new-privileges"])  # fmt: skip


def up(
    manifest: Manifest, client: docker.DockerClient, state: StateStore, *, prepare_options: dict[str, Any],
    on_step: Progress, ready_timeout: float,
) -> DockerBottlePlan:  # fmt: skip
    """Bring the bottle up, or adopt the parts that are already up; undo this run's work on any failure."""
    with sidecar.undone_on_failure(manifest.slug) as undo:
        plan = step("network", lambda: prepare_parts(manifest, client, state, undo, **prepare_options))
        owner = state.owner(create=True)
        on_step("network", f"{plan.network_name} {plan.bundle_subnet} (internal), {plan.egress_network_name}")
        sidecar.bring_up_bundle(manifest, client, state, plan.site, owner, undo, on_step, ready_timeout)
        step("agent", lambda: ensure_agent(client, plan, owner, undo, on_step))
        on_step("agent", f"{plan.agent_container_name} on {plan.network_name} only")
    return plan


def attach(plan: DockerBottlePlan, *, tty: bool) -> int:
    """Run the agent's command in its container with the user's terminal attached (`docker exec`)."""
    cli = shutil.which("docker")
    if cli is None:
        raise EnvironmentProblem(
            f"attaching needs the docker command on PATH; the bottle is up: `docker exec -it "
            f"{plan.agent_container_name} {' '.join(plan.agent_command)}` is what it would run"
        )
    flags = ["-i", "-t"] if tty else ["-i"]
    argv = [cli, "exec", *flags, "-w", WORKDIR, plan.agent_container_name, *plan.agent_command]
    return subprocess.run(argv).returncode


def run(client: docker.DockerClient, plan: DockerBottlePlan, command: list[str], timeout: float) -> tuple[int, str]:
    """Run `command` in the agent's container, without a terminal; its exit code and output."""
    container = client.containers.get(plan.agent_container_name)
    result = container.exec_run(["timeout", str(max(1, int(timeout))), *command], workdir=WORKDIR)
    return result.exit_code, (result.output or b"").decode(errors="replace")


def down(slug: str, client: docker.DockerClient, state: StateStore) -> list[str]:
    return sidecar.down(slug, client, state, BACKEND)


def inventory(client: docker.DockerClient, state: StateStore) -> list[BottleStatus]:
    found = sidecar.survey_bottles(client, state, BACKEND, DockerBottlePlan)
    parts = ["network", "egress-network", "bundle", "agent"]
    return sidecar.statuses(found, BACKEND, parts, lambda plan: str(plan.bundle_ip))
