"""KubernetesBottlePlan: the objects a bottle is on a cluster, rendered once from the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from bottle.plan import BottlePlan
from bottle.sidecar import PROXY_PORT


class KubernetesBottlePlan(BottlePlan):
    """A bottle on Kubernetes: every object `up` applies, in order, as the API server is sent it.

    The data of the bundle's ConfigMap and Secret is never in the plan: it names the host file each value
    is read from at `up` (the credentials, the CA's key). The agent's proxy is the bundle Service's
    ClusterIP, which the API server assigns: `bundle_ip` is None, and the agent's environment holds
    `UNASSIGNED_IP`, until `up` has made the Service; the saved plan then holds the address. Likewise
    the `bottle.owner` label reads `unassigned` in a plan shown before the state directory has an owner id.
    """

    backend: Literal["kubernetes"] = "kubernetes"
    context: str  # the kubeconfig context the objects live in
    server: str  # that context's API server, for people reading the plan
    namespace: str
    own_namespace: bool  # the namespace is the bottle's: made by `up`, removed by `down`
    bundle_ip: str | None  # the bundle Service's ClusterIP, once `up` has made it
    bundle_dir: Path  # the bundle's config, CA and secrets on the host, sent to the cluster at `up`
    objects: list[dict[str, Any]]

    @property
    def proxy_url(self) -> str:
        return f"http://{self.bundle_ip}:{PROXY_PORT}"
