"""The kubernetes backend's steps: render the bottle's objects, apply them in order, wait, and find them again.

`up` applies the policies before any Pod exists, then the bundle's Secret, the agent's CA and the bundle's
Service; then the agent's Pod, its proxy the Service's ClusterIP; once that runs, the bundle's config
(its one client the agent's Pod IP) and the bundle's Pod. An object that exists is adopted only if it
carries this state root's labels and was made from the same rendering (a keyed digest in its
`bottle.config` annotation); otherwise it is updated in place (policies, config) or made anew (Pods, the
Service). Whatever this run created is deleted again if a later step fails.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from ipaddress import ip_network
from typing import Any

from bottle import sidecar
from bottle.backend import LABEL_BACKEND, LABEL_MANAGED, LABEL_ROLE, BottleStatus
from bottle.backends.kubernetes import made, render
from bottle.backends.kubernetes.cluster import KINDS, Cluster, contexts
from bottle.backends.kubernetes.plan import KubernetesBottlePlan
from bottle.bundle import CA_DIR
from bottle.bundle.ca import CA_FILE
from bottle.errors import BottleError, StateError, StepFailed
from bottle.manifest import Manifest
from bottle.sidecar import Progress, step
from bottle.state import PLAN_FILE, StateStore
from bottle.undo import Undo

BACKEND = render.BACKEND
LABEL_CONFIG = sidecar.LABEL_CONFIG  # an annotation here: the keyed digest of what the object was made from
NO_OWNER = "unassigned"  # the owner label in a plan shown before this state root has an owner id
# Waiting reasons of a container that will not start by waiting longer.
HOPELESS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
            "CreateContainerError", "CrashLoopBackOff", "RunContainerError"}  # fmt: skip
DELETE_ORDER = ["Pod", "Service", "ConfigMap", "Secret", "NetworkPolicy", "Namespace"]  # policies outlive Pods


def where(context: str | None) -> tuple[str, str]:
    """The kubeconfig context a plan names, and its server, without a request; placeholders without one."""
    try:
        cluster = Cluster.connect(context)
    except BottleError:
        return context or "(current context)", "(no usable kubeconfig context)"
    return cluster.context, cluster.server


def build_plan(manifest: Manifest, state: StateStore, owner: str | None, context: tuple[str, str],
               bundle_ip: str | None = None) -> KubernetesBottlePlan:  # fmt: skip
    bundle_dir = state.bottle_dir(manifest.slug) / "bundle"
    return KubernetesBottlePlan(
        name=manifest.name,
        slug=manifest.slug,
        context=context[0],
        server=context[1],
        namespace=render.namespace_name(manifest),
        own_namespace=manifest.kubernetes.namespace is None,
        bundle_ip=bundle_ip,
        bundle_dir=bundle_dir,
        objects=render.render(manifest, owner=owner or NO_OWNER, bundle_dir=bundle_dir, bundle_ip=bundle_ip),
    )


def saved_plan(state: StateStore, slug: str) -> KubernetesBottlePlan | None:
    """The bottle's plan on disk if this backend made it; StateError or ValueError if it cannot be read."""
    data = state.read_plan_data(slug)
    if not data or data.get("backend") != BACKEND:
        return None
    return KubernetesBottlePlan.model_validate(data)


def plan(manifest: Manifest, state: StateStore) -> KubernetesBottlePlan:
    """The plan `prepare` would make now: reads the kubeconfig, asks the cluster nothing. For a bottle that
    is up with this very manifest, the saved plan, which holds the Service's ClusterIP."""
    fresh = build_plan(manifest, state, state.owner(), where(manifest.kubernetes.context))
    try:
        saved = saved_plan(state, manifest.slug)
    except (StateError, ValueError):
        return fresh
    if saved is not None and saved.bundle_ip is not None:
        running = build_plan(manifest, state, state.owner(), (fresh.context, fresh.server), saved.bundle_ip)
        if running == saved:
            return saved
    return fresh


def prepare_parts(manifest: Manifest, client: Any, state: StateStore, undo: Undo) -> KubernetesBottlePlan:
    """Write the bundle's config and CA and save the plan; nothing is sent to the cluster yet."""
    slug = manifest.slug
    if state.read(state.bottle_dir(slug) / PLAN_FILE) is None:
        undo.push(f"state {state.bottle_dir(slug)}", lambda: state.remove_bottle(slug))
    state.owner(create=True)
    result = plan(manifest, state)
    sidecar.write_bundle_files(manifest, state, result.bundle_dir, render.guest_dir(result.bundle_dir),
                               list(manifest.kubernetes.cluster_cidrs), dns_port=render.DNS_PORT)  # fmt: skip
    state.save_plan(result)
    return result


def prepare(manifest: Manifest, state: StateStore) -> KubernetesBottlePlan:
    return sidecar.prepare(prepare_parts, manifest, None, state)


# -- up -----------------------------------------------------------------------------------------------------


def filled(obj: dict[str, Any], plan: KubernetesBottlePlan, state: StateStore) -> dict[str, Any]:
    """The object as it is sent: each value the plan names a host file for, read from that file."""
    files = render.data_files(plan.bundle_dir)
    suffix = obj["metadata"]["name"].removeprefix(render.base_name(plan.slug) + "-")
    field = {"ConfigMap": "data", "Secret": "stringData"}.get(obj["kind"])
    if field is None:
        return obj
    result = copy.deepcopy(obj)
    for key in result[field]:
        data = state.read(files[(suffix, key)])
        if data is None:
            raise StateError(f"{files[(suffix, key)]} is missing; run `bottle up` again to make it anew")
        result[field][key] = data.decode()
    return result


def digest(key: bytes, *objects: dict[str, Any]) -> str:
    """What objects were made from, keyed with the bottle's CA: a Secret's digest shows nothing of it."""
    text = json.dumps(objects, sort_keys=True).encode()
    return hmac.new(key, text, hashlib.sha256).hexdigest()[:32]


def annotated(obj: dict[str, Any], value: str) -> dict[str, Any]:
    result = copy.deepcopy(obj)
    result["metadata"]["annotations"] = {LABEL_CONFIG: value}
    return result


def _same_data(found: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a ConfigMap or Secret holds what it should (a Secret comes back base64-encoded)."""
    if wanted["kind"] == "Secret":
        values = {k: base64.b64decode(v).decode(errors="replace") for k, v in (found.get("data") or {}).items()}
        return values == wanted["stringData"]
    if wanted["kind"] == "ConfigMap":
        return (found.get("data") or {}) == wanted["data"]
    return True


# Fields of bottle's objects that API servers before 1.30 do not know and drop.
DROPPED_BY_OLDER_SERVERS = frozenset({"appArmorProfile"})
EXACT = {"selector", "matchLabels"}  # maps the server adds nothing to, where one more key changes what matches


def differences(found: Any, wanted: Any, path: tuple[str, ...] = (), dropped: frozenset[str] = frozenset()) -> list[str]:
    """Where an object as the API server holds it differs from what bottle rendered: every rendered field
    must be there with its value (an empty list or map, or false, may be left out: the server omits them,
    which means the same; so may a field in `dropped`, one an older server does not know); lists must
    match item for item. The server may add defaults of its own, except to a label selector."""
    here = ".".join(path) or "(top)"
    if isinstance(wanted, dict):
        if not isinstance(found, dict) or (path and path[-1] in EXACT and set(found) != set(wanted)):
            return [f"{here}: {found!r} instead of {wanted!r}"]
        return [miss for key, value in wanted.items() if not (key not in found and (value in ([], {}, False) or key in dropped))
                for miss in differences(found.get(key, "<missing>"), value, (*path, key), dropped)]  # fmt: skip
    if isinstance(wanted, list):
        if not isinstance(found, list) or len(found) != len(wanted):
            return [f"{here}: {found!r} instead of {wanted!r}"]
        return [miss for index, (f, w) in enumerate(zip(found, wanted))
                for miss in differences(f, w, (*path, str(index)), dropped)]  # fmt: skip
    return [] if found == wanted else [f"{here}: {found!r} instead of {wanted!r}"]


def as_rendered(found: dict[str, Any], obj: dict[str, Any]) -> bool:
    """Whether a live object still is what bottle made: its data, and every field it rendered."""
    rendered = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "data", "stringData")}
    return _same_data(found, obj) and not differences(found, rendered, dropped=DROPPED_BY_OLDER_SERVERS)


def ensure(cluster: Cluster, obj: dict[str, Any], slug: str, state: StateStore, undo: Undo) -> dict[str, Any]:
    """Create `obj`, or adopt the one there if bottle made it (its uid is on record) and it still is what
    bottle renders now; one that differs is updated in place (policies, config) or made anew."""
    kind, meta = obj["kind"], obj["metadata"]
    namespace = meta.get("namespace")
    found = cluster.read(kind, meta["name"], namespace)
    if found is not None:
        uid = found["metadata"]["uid"]
        if uid not in {entry.uid for entry in made.load(state, slug)}:
            where = f" in namespace {namespace}" if namespace else ""
            raise BottleError(f"{kind} {meta['name']}{where} exists but this bottle state directory did not make it; "
                              f"remove it or rename the bottle")  # fmt: skip
        if found["metadata"].get("deletionTimestamp"):
            raise BottleError(f"{kind} {meta['name']} is being deleted; wait until it is gone, then `bottle up` again")
        annotations = found["metadata"].get("annotations") or {}
        broken = kind == "Pod" and (found.get("status") or {}).get("phase") in {"Succeeded", "Failed"}
        if annotations.get(LABEL_CONFIG) == meta["annotations"][LABEL_CONFIG] and as_rendered(found, obj) and not broken:
            return found
        if kind in {"NetworkPolicy", "ConfigMap", "Secret", "Namespace"}:  # updated in place: never a gap
            update = copy.deepcopy(obj)
            update["metadata"]["resourceVersion"] = found["metadata"]["resourceVersion"]
            return cluster.replace(update)
        cluster.delete(kind, meta["name"], namespace, uid)
        wait_gone(cluster, kind, meta["name"], namespace, uid)
        made.forget(state, slug, uid)
    created = cluster.create(obj)
    uid = created["metadata"]["uid"]
    made.record(state, slug, made.Made(context=cluster.context, kind=kind, namespace=namespace, name=meta["name"], uid=uid))

    def remove() -> None:
        cluster.delete(kind, meta["name"], namespace, uid)
        made.forget(state, slug, uid)

    undo.push(f"{kind} {meta['name']}", remove)
    return created


def wait_gone(cluster: Cluster, kind: str, name: str, namespace: str | None, uid: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (found := cluster.read(kind, name, namespace)) is not None and found["metadata"]["uid"] == uid:
        if time.monotonic() > deadline:
            where = f" in {namespace}" if namespace else ""
            raise BottleError(f"{kind} {name}{where} was deleted but is still there after {timeout:.0f} s")
        time.sleep(0.5)


def selects(selector: dict[str, Any], pod_labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions) matches a Pod with `pod_labels`."""
    if any(pod_labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, values = expression.get("key"), expression.get("values") or []
        matched = {"In": pod_labels.get(key) in values, "NotIn": pod_labels.get(key) not in values,
                   "Exists": key in pod_labels, "DoesNotExist": key not in pod_labels}.get(expression.get("operator"), True)  # fmt: skip
        if not matched:
            return False
    return True


def check_other_policies(cluster: Cluster, planned: KubernetesBottlePlan, state: StateStore) -> None:
    """Refuse a namespace where a NetworkPolicy not of this bottle selects its Pods: policies add up, so
    any rule of another's (allow DNS, allow the namespace) would open what the bottle's own shut."""
    pods = [o for o in planned.objects if o["kind"] == "Pod"]
    ours = {entry.uid for entry in made.load(state, planned.slug)}
    for policy in cluster.list("NetworkPolicy", "", planned.namespace):
        if policy["metadata"]["uid"] in ours:
            continue
        hit = [p["metadata"]["name"] for p in pods if selects(policy["spec"].get("podSelector") or {}, p["metadata"]["labels"])]
        if hit:
            raise StepFailed("NetworkPolicy", f"NetworkPolicy {policy['metadata']['name']} in namespace {planned.namespace}, "
                             f"which bottle did not make, also applies to {', '.join(hit)} and could allow what the "
                             "bottle's policies deny; remove it, or give the bottle a namespace of its own")  # fmt: skip


def pod_problem(pod: dict[str, Any]) -> str | None:
    """Why a Pod will not become ready by waiting, if it is clear already."""
    status = pod.get("status") or {}
    if status.get("phase") in {"Failed", "Succeeded"}:
        return f"it has stopped ({status['phase']}{': ' + status['message'] if status.get('message') else ''})"
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in HOPELESS:
            return f"{waiting['reason']}: {waiting.get('message') or 'no message'}"
    return None


def pod_state(pod: dict[str, Any]) -> str:
    """A Pod's state in a few words: why it is pending, if it is."""
    status = pod.get("status") or {}
    unscheduled = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"
                        and c.get("status") == "False"), None)  # fmt: skip
    if unscheduled:
        return f"not scheduled: {unscheduled.get('message') or unscheduled.get('reason')}"
    if status.get("phase") == "Running":
        return "running, but its readiness check does not pass"
    return f"phase {status.get('phase') or 'unknown'}{', not yet assigned to a node' if not pod['spec'].get('nodeName') else ''}"


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def is_running(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") == "Running"


def wait_for(cluster: Cluster, pod: dict[str, Any], what: str, done: Callable[[dict[str, Any]], bool],
             step_name: str, timeout: float) -> dict[str, Any]:  # fmt: skip
    """Poll a Pod until `done`; stop early when it cannot get there, with a sentence either way."""
    meta = pod["metadata"]
    deadline = time.monotonic() + timeout
    while True:
        found = cluster.read("Pod", meta["name"], meta["namespace"])
        if found is None:
            raise StepFailed(step_name, f"Pod {meta['name']} disappeared while bottle waited for it to be {what}")
        if done(found):
            return found
        if problem := pod_problem(found):
            raise StepFailed(step_name, f"Pod {meta['name']} will not be {what}: {problem}")
        if time.monotonic() > deadline:
            raise StepFailed(step_name, f"Pod {meta['name']} was not {what} within {timeout:.0f} s ({pod_state(found)}); "
                                        "BOTTLE_READY_TIMEOUT sets how long to wait")  # fmt: skip
        time.sleep(0.5)


def up(manifest: Manifest, state: StateStore, *, on_step: Progress, ready_timeout: float) -> KubernetesBottlePlan:
    """Apply the bottle's objects in order, wait for the agent and the bundle; undo this run's work on failure.

    The bundle comes last: its config names the agent's Pod IP as the one client it serves, which the
    NetworkPolicy alone cannot promise (most network plugins let a node's own processes and host-network
    Pods reach every Pod on it).
    """
    with sidecar.undone_on_failure(manifest.slug) as undo:
        planned = step("plan", lambda: prepare_parts(manifest, None, state, undo))
        cluster = step("cluster", lambda: Cluster.connect(manifest.kubernetes.context))
        owner = state.owner(create=True)
        on_step("cluster", f"context {cluster.context} ({cluster.server}), namespace {planned.namespace}")
        step("secrets", lambda: sidecar.write_secrets(manifest, planned.bundle_dir, state))
        key = state.read(planned.bundle_dir / CA_DIR / CA_FILE) or b""

        def apply(obj: dict[str, Any], *made_from: dict[str, Any]) -> dict[str, Any]:
            sent = step(obj["kind"], lambda: filled(obj, planned, state))
            return step(obj["kind"], lambda: ensure(cluster, annotated(sent, digest(key, sent, *made_from)),
                                                    manifest.slug, state, undo))  # fmt: skip

        *infrastructure, _, _, _ = planned.objects
        for obj in infrastructure:
            apply(obj)
        step("NetworkPolicy", lambda: check_other_policies(cluster, planned, state))
        on_step("objects", ", ".join(f"{obj['kind']} {obj['metadata']['name']}" for obj in infrastructure))
        service = step("Service", lambda: cluster.read("Service", infrastructure[-1]["metadata"]["name"], planned.namespace))
        bundle_ip = (service or {}).get("spec", {}).get("clusterIP")
        if not bundle_ip or bundle_ip == "None":
            raise StepFailed("Service", f"Service {infrastructure[-1]['metadata']['name']} has no ClusterIP")
        result = build_plan(manifest, state, owner, (planned.context, planned.server), bundle_ip)
        agent, config, bundle = result.objects[-3:]
        apply(agent)
        agent = step("agent", lambda: wait_for(cluster, agent, "running", is_running, "agent", ready_timeout))
        agent_ip = step("agent", lambda: pod_ip(agent))
        on_step("agent", f"Pod {agent['metadata']['name']} at {agent_ip}, its one way out {result.proxy_url}")
        step("bundle config", lambda: sidecar.write_bundle_files(
            manifest, state, result.bundle_dir, render.guest_dir(result.bundle_dir), list(manifest.kubernetes.cluster_cidrs),
            clients=[ip_network(agent_ip)], dns_port=render.DNS_PORT))  # fmt: skip
        apply(config)
        apply(bundle, *(filled(obj, result, state) for obj in result.objects if obj["kind"] in {"Secret", "ConfigMap"}))
        on_step("bundle start", f"Pod {bundle['metadata']['name']}, serving {agent_ip} alone")
        step("bundle ready", lambda: wait_for(cluster, bundle, "ready", is_ready, "bundle ready", ready_timeout))
        on_step("bundle ready", f"proxy at {result.proxy_url}")
        state.save_plan(result)
    return result


def pod_ip(pod: dict[str, Any]) -> str:
    found = (pod.get("status") or {}).get("podIP")
    if not found:
        raise BottleError(f"Pod {pod['metadata']['name']} runs but has no IP address")
    return found


# -- down, ls ----------------------------------------------------------------------------------------------


def _selector(wanted: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in wanted.items())


def _objects(cluster: Cluster, selector: str, namespaces: list[str]) -> list[dict[str, Any]]:
    """Every object of the six kinds matching `selector`: across namespaces where the cluster lets us
    list them so, else in `namespaces` (the ones bottle's records name)."""
    found = []
    for kind in KINDS:
        try:
            items = cluster.list(kind, selector)
        except BottleError:
            if not namespaces:
                raise
            items = [] if kind == "Namespace" else [item for ns in namespaces for item in cluster.list(kind, selector, ns)]
        found += [item | {"kind": kind} for item in items]
    return found


def down(slug: str, state: StateStore) -> list[str]:
    """Delete every object bottle made for the bottle (by the uids on record), Pods first, policies once the
    Pods are gone, the Namespace last; then its state, kept while anything could not be deleted."""
    entries = sorted(made.load(state, slug), key=lambda entry: DELETE_ORDER.index(entry.kind))
    removed: list[str] = []
    failed: list[str] = []
    clusters: dict[str, Cluster] = {}
    for entry in entries:
        where = f" in {entry.namespace}" if entry.namespace else ""
        try:
            cluster = clusters.get(entry.context) or clusters.setdefault(entry.context, Cluster.connect(entry.context))
            if entry.kind == "NetworkPolicy":  # the Pods they confine must be gone first
                for pod in (e for e in entries if e.kind == "Pod" and e.context == entry.context):
                    wait_gone(cluster, "Pod", pod.name, pod.namespace, pod.uid)
            if cluster.delete(entry.kind, entry.name, entry.namespace, entry.uid):
                removed.append(f"{entry.kind} {entry.name}{where}")
            made.forget(state, slug, entry.uid)
        except BottleError as exc:
            failed.append(f"{entry.kind} {entry.name}{where}: {exc}")
    if failed:
        done = f" (removed: {', '.join(removed)})" if removed else ""
        raise BottleError(f"could not remove all of bottle '{slug}': {'; '.join(failed)}; kept its state until the "
                          f"rest is removed{done}")  # fmt: skip
    if sidecar.removes_state(state, slug, BACKEND) and (path := state.remove_bottle(slug)) is not None:
        removed.append(f"state {path}")
    return removed


def part_status(item: dict[str, Any]) -> str:
    if item["kind"] != "Pod":
        return "present"
    phase = (item.get("status") or {}).get("phase") or "Unknown"
    if phase == "Running":
        return "running" if is_ready(item) or item["metadata"]["labels"].get(LABEL_ROLE) == render.AGENT else "starting"
    return {"Succeeded": "exited", "Failed": "failed"}.get(phase, phase.lower())


def inventory(state: StateStore) -> list[BottleStatus]:
    """Every kubernetes bottle this state root knows of, by its plan on disk or its objects on record; and
    every object that carries bottle's labels but is not on record, as foreign."""
    found = sidecar.Found(plans=sidecar.saved_plans(state, BACKEND, KubernetesBottlePlan))
    recorded = {slug: made.load(state, slug) for slug in made.slugs(state)}
    ours = {entry.uid: slug for slug, entries in recorded.items() for entry in entries}
    places: dict[str, set[str]] = {}
    for entry in (e for entries in recorded.values() for e in entries):
        places.setdefault(entry.context, set()).add(entry.namespace or "")
    current = contexts()[1]
    if current is not None:
        places.setdefault(current, set())
    for context, namespaces in sorted(places.items()):
        cluster = Cluster.connect(context)
        selector = _selector({LABEL_MANAGED: "true", LABEL_BACKEND: BACKEND})
        for item in _objects(cluster, selector, sorted(namespaces - {""})):
            meta, kind = item["metadata"], item["kind"]
            if meta.get("deletionTimestamp"):
                continue  # on its way out (a Namespace waits for the cluster to empty it)
            slug = ours.get(meta["uid"])
            if slug is None:
                where = f" -n {meta['namespace']}" if meta.get("namespace") else ""
                command = f"kubectl delete {kind.lower()} {meta['name']}{where}"
                why = "carries bottle's labels but bottle has no record of making it"
                found.foreign.append(sidecar.foreign(BACKEND, f"{kind} {meta['name']}{where}", why, command))
                continue
            role = (meta.get("labels") or {}).get(LABEL_ROLE)
            part = role if kind == "Pod" else "policies" if kind == "NetworkPolicy" else "config"
            if part in found.parts.get(slug, {}) and kind != "Pod":
                continue
            found.add(slug, part, part_status(item))
    for slug in recorded:  # on record, but nothing of it found: still a bottle `down` or `gc` can finish
        found.parts.setdefault(slug, {})
    return sidecar.statuses(found, BACKEND, ["config", "policies", "bundle", "agent"], lambda p: p.bundle_ip or "-")
