"""The kubernetes backend: the same bottle on a cluster, its confinement the cluster's NetworkPolicies.

It needs no Docker Engine: everything goes through the API server of a kubeconfig context, with the
official `kubernetes` client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from kubernetes.client.rest import ApiException

from bottle.backend import Backend, BottleStatus, Check, PreflightReport
from bottle.backends.kubernetes import launch, render, session
from bottle.backends.kubernetes.cluster import Cluster, refusal
from bottle.backends.kubernetes.plan import KubernetesBottlePlan
from bottle.errors import BottleError
from bottle.sidecar import seconds_from_env

if TYPE_CHECKING:
    import docker

    from bottle.manifest import Manifest
    from bottle.state import StateStore

__all__ = ["KubernetesBackend", "KubernetesBottlePlan"]

# What `up`, `down` and `logs` ask of the API server, namespace-scoped: (verb, group, resource, subresource).
NEEDED = [
    *((verb, "", resource, "") for resource in ("pods", "services", "configmaps", "secrets")
      for verb in ("create", "get", "update", "delete")),
    *((verb, "networking.k8s.io", "networkpolicies", "") for verb in ("create", "get", "list", "update", "delete")),
    ("create", "", "pods", "attach"), ("create", "", "pods", "exec"), ("get", "", "pods", "log"),
]  # fmt: skip
NETWORK_POLICY_NOTE = (
    "a NetworkPolicy is enforced only if the cluster's network plugin (CNI) implements it (Calico, Cilium, "
    "Antrea, kube-router, GKE Dataplane V2 do; flannel alone and kindnet before 0.24 do not). Check it before "
    "trusting a bottle there: the confinement suite shows it from inside a running agent "
    "(BOTTLE_TEST_KUBECONTEXT=<context> pytest tests/cluster)"
)


class KubernetesBackend(Backend):
    """Runs bottles on a Kubernetes cluster. Settings from the environment: $KUBECONFIG (default
    ~/.kube/config) and $BOTTLE_READY_TIMEOUT (seconds `up` waits for each Pod, default 120)."""

    name = "kubernetes"
    plan_type = KubernetesBottlePlan
    needs_docker = False

    def __init__(self) -> None:
        self.ready_timeout = seconds_from_env("BOTTLE_READY_TIMEOUT", 120.0)

    def preflight(self, *, docker: docker.DockerClient | None, manifest: Manifest | None = None) -> PreflightReport:
        config = manifest.kubernetes if manifest is not None and manifest.backend == self.name else None
        fix = "point KUBECONFIG at a kubeconfig whose context reaches the cluster, or set [kubernetes] context"
        try:
            cluster = Cluster.connect(config.context if config else None)
            version = str(cluster.raw("VersionApi", "get_code").get("gitVersion", "unknown version"))
        except ApiException as exc:
            checks = [Check(name="cluster", ok=False, detail=f"{cluster.server} refused: {refusal(exc)}", fix=fix)]
            return PreflightReport(backend=self.name, checks=checks)
        except BottleError as exc:
            checks = [Check(name="cluster", ok=False, detail=str(exc), fix=fix)]
            return PreflightReport(backend=self.name, checks=checks)
        namespace = render.namespace_name(manifest) if config else None
        checks = [Check(name="cluster", ok=True, detail=f"{cluster.server} (context {cluster.context}) answers: {version}")]
        checks.append(self._rbac(cluster, namespace, own_namespace=config is None or config.namespace is None))
        checks.append(self._runtime_class(cluster, config.runtime_class if config else None))
        checks.append(Check(name="network policy", ok=True, detail=NETWORK_POLICY_NOTE))
        return PreflightReport(backend=self.name, checks=checks, facts={"server_version": version})

    @staticmethod
    def _rbac(cluster: Cluster, namespace: str | None, *, own_namespace: bool) -> Check:
        """What bottle does, asked of the API server as this user (SelfSubjectAccessReview)."""
        needed = [(verb, group, resource, sub, namespace or "") for verb, group, resource, sub in NEEDED]
        if own_namespace:
            needed += [(verb, "", "namespaces", "", "") for verb in ("create", "get", "update", "delete")]
        denied = []
        try:
            for verb, group, resource, sub, ns in needed:
                review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview", "spec": {
                    "resourceAttributes": {"verb": verb, "group": group, "resource": resource,
                                           "subresource": sub, "namespace": ns}}}  # fmt: skip
                answer = cluster.raw("AuthorizationV1Api", "create_self_subject_access_review", review)
                if (answer.get("status") or {}).get("allowed") is not True:
                    denied.append(f"{verb} {resource}{'/' + sub if sub else ''}")
        except ApiException as exc:
            return Check(name="rbac", ok=False, detail=f"could not ask the API server: {refusal(exc)}")
        except BottleError as exc:
            return Check(name="rbac", ok=False, detail=f"could not ask the API server: {exc}")
        where = f"namespace {namespace}" if namespace else "every namespace"
        if denied:
            return Check(name="rbac", ok=False, detail=f"not allowed in {where}: {', '.join(denied)}",
                         fix="ask the cluster's admin for a Role with these verbs, or use another [kubernetes] namespace")
        return Check(name="rbac", ok=True, detail=f"allowed in {where}: everything bottle does ({len(needed)} checks)")

    @staticmethod
    def _runtime_class(cluster: Cluster, wanted: str | None) -> Check:
        try:
            items = cluster.raw("NodeV1Api", "list_runtime_class").get("items") or []
        except (ApiException, BottleError) as exc:
            why = refusal(exc) if isinstance(exc, ApiException) else str(exc)
            return Check(name="runtime class", ok=wanted is None, detail=f"could not list RuntimeClasses: {why}")
        names = sorted(str((item.get("metadata") or {}).get("name")) for item in items if isinstance(item, dict))
        shown = ", ".join(names) or "none"
        if wanted is None:
            return Check(name="runtime class", ok=True, detail=f"the cluster's default ([kubernetes] runtime_class "
                                                                 f"names one of: {shown})")  # fmt: skip
        return Check(name="runtime class", ok=wanted in names, detail=f"'{wanted}' among the cluster's: {shown}",
                     fix="install that RuntimeClass (gVisor's runsc, Kata) or fix [kubernetes] runtime_class")

    def plan(self, manifest: Manifest, *, docker: Any, state: StateStore, preflight: PreflightReport) -> KubernetesBottlePlan:
        return launch.plan(manifest, state)

    def prepare(self, manifest: Manifest, *, docker: Any, state: StateStore, preflight: PreflightReport) -> KubernetesBottlePlan:
        return launch.prepare(manifest, state)

    def up(self, manifest: Manifest, *, docker: Any, state: StateStore, preflight: PreflightReport,
           on_step: Callable[[str, str], None]) -> KubernetesBottlePlan:  # fmt: skip
        return launch.up(manifest, state, on_step=on_step, ready_timeout=self.ready_timeout)

    def attach(self, plan: KubernetesBottlePlan, *, tty: bool) -> int:  # type: ignore[override]
        return session.attach(Cluster.connect(plan.context), plan, tty=tty)

    def run(self, plan: KubernetesBottlePlan, command: list[str], *, docker: Any,  # type: ignore[override]
            timeout: float) -> tuple[int, str]:  # fmt: skip
        return session.run(Cluster.connect(plan.context), plan, command, timeout)

    def down(self, slug: str, *, docker: Any, state: StateStore) -> list[str]:
        return launch.down(slug, state)

    def inventory(self, *, docker: Any, state: StateStore) -> list[BottleStatus]:
        return launch.inventory(state)

    def bundle_log(self, slug: str, *, docker: Any, state: StateStore, follow: bool) -> Iterator[bytes]:
        plan = launch.saved_plan(state, slug)
        if plan is None or plan.bundle_ip is None:
            raise BottleError(f"bottle '{slug}' has not been brought up on a cluster from this state directory")
        return session.bundle_log(Cluster.connect(plan.context), plan, follow=follow)
