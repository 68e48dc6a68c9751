"""The Kubernetes objects of one bottle, rendered from its manifest: pure data, no cluster needed.

    Namespace      bottle-<slug> (unless [kubernetes] namespace names an existing one), Pod Security
                   "restricted" enforced on it
    NetworkPolicy  <name>-agent: the agent sends only to its bundle's Pod on 8888, receives nothing
    NetworkPolicy  <name>-bundle: the bundle receives only from its agent on 8888; sends to the internet
                   (never to the cluster's ranges or metadata addresses) and to the cluster's DNS
    Secret         <name>-bundle-keys: the bundle's CA (key and certificate) and the credentials
    ConfigMap      <name>-ca: the CA's certificate alone, for the agent
    Service        <name>-bundle: ClusterIP, port 8888, to the bundle's Pod
    Pod            <name>-agent: the agent, its proxy the Service's ClusterIP (an IP literal, no DNS)
    ConfigMap      <name>-bundle: the bundle's policy (config.json), its one client the agent's Pod IP
    Pod            <name>-bundle: the proxy, config and CA mounted read-only; it serves the agent's Pod IP alone

where <name> is bottle-<slug>. Every object carries the bottle's labels (`bottle.backend.labels`) and a
role, which is how `ls` and `gc` find it; what makes it the bottle's own is the uid bottle recorded when
it made it (bottle.backends.kubernetes.made).
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network, collapse_addresses, ip_network
from pathlib import Path
from typing import Any

from bottle import sidecar
from bottle.backend import LABEL_ROLE, labels
from bottle.bundle import CA_DIR, CONFIG_FILE, SECRETS_FILE
from bottle.bundle.ca import CA_FILE
from bottle.bundle.policy import NEVER
from bottle.manifest import Manifest

BACKEND = "kubernetes"
AGENT, BUNDLE = "agent", sidecar.BUNDLE
BUNDLE_USER = 65532  # the bundle's uid and gid: it reads its config through fsGroup, never as root
WORKDIR = "/workspace"
UNASSIGNED_IP = "0.0.0.0"  # the agent's proxy address until the API server assigns the Service's ClusterIP
# The DNS refuser's port: the agent is sent no DNS at all here (its NetworkPolicy), and an unprivileged
# bundle cannot bind 53 where the cluster keeps the kernel's default unprivileged port range.
DNS_PORT = 8853
# The cluster's DNS, which the bundle (not the agent) resolves allowlisted names with: kube-dns (CoreDNS
# keeps the label), or NodeLocal DNSCache on its link-local address, port 53 alone.
CLUSTER_DNS = [
    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
     "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}},
    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
     "podSelector": {"matchLabels": {"k8s-app": "node-local-dns"}}},
    {"ipBlock": {"cidr": "169.254.20.10/32"}},
]  # fmt: skip
# Never sent to by the bundle's NetworkPolicy besides the bundle's own NEVER: NAT64, whose IPv4 inside
# may be private (the bundle's policy checks that address; the NetworkPolicy cannot).
ALSO_SHUT = [ip_network("64:ff9b::/96")]
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}
HARDENED = {
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
}


def base_name(slug: str) -> str:
    return sidecar.resource_name(slug)


def namespace_name(manifest: Manifest) -> str:
    return manifest.kubernetes.namespace or base_name(manifest.slug)


def from_file(path: Path) -> str:
    """What the plan shows for a value `up` reads from a host file: never the value itself."""
    return f"(read from {path} by bottle up)"


def guest_dir(bundle_dir: Path) -> Path:
    """Where the CA's certificate alone is kept for the agent, beside the bundle's directory."""
    return bundle_dir.parent / "guest"


def data_files(bundle_dir: Path) -> dict[tuple[str, str], Path]:
    """(object name suffix, key) -> the host file that fills it at `up`."""
    return {
        ("bundle", CONFIG_FILE): bundle_dir / CONFIG_FILE,
        ("bundle-keys", CA_FILE): bundle_dir / CA_DIR / CA_FILE,
        ("bundle-keys", SECRETS_FILE): bundle_dir / SECRETS_FILE,
        ("ca", "ca.pem"): guest_dir(bundle_dir) / "ca.pem",
    }


def egress_blocks(cluster: Iterable[IPv4Network | IPv6Network]) -> list[dict[str, Any]]:
    """Everywhere but the cluster's ranges and what the bundle's policy never reaches, as ipBlocks."""
    blocks = []
    for everything in (ip_network("0.0.0.0/0"), ip_network("::/0")):
        shut = [n for n in [*cluster, *NEVER, *ALSO_SHUT] if n.version == everything.version]
        blocks.append({"ipBlock": {"cidr": str(everything), "except": [str(n) for n in collapse_addresses(shut)]}})
    return blocks


def egress_ports(manifest: Manifest) -> list[dict[str, Any]]:
    """The ports the allowlist names (TCP): the only ones the bundle's NetworkPolicy lets it send to."""
    ports = sorted({port for rule in manifest.egress.allow for port in rule.ports})
    return [{"protocol": "TCP", "port": port} for port in ports or [443]]


def _meta(name: str, namespace: str, slug: str, owner: str, role: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels(slug, BACKEND, owner) | {LABEL_ROLE: role}}


def _selector(slug: str, owner: str, role: str) -> dict[str, Any]:
    return {"matchLabels": labels(slug, BACKEND, owner) | {LABEL_ROLE: role}}


def _pod_security(uid: int, gid: int) -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid, "fsGroup": gid,
            "seccompProfile": {"type": "RuntimeDefault"}, "appArmorProfile": {"type": "RuntimeDefault"}}  # fmt: skip


def _pod_spec(security: dict[str, Any], slug: str, owner: str, other: str) -> dict[str, Any]:
    """What both Pods share: no API token, no service links, no host namespaces; and, where the cluster
    has room, not the node the `other` Pod is on (a kernel escape from the agent then finds no bundle
    Secret on its node)."""
    apart = {"weight": 100, "podAffinityTerm": {"labelSelector": _selector(slug, owner, other),
                                                "topologyKey": "kubernetes.io/hostname"}}  # fmt: skip
    return {"automountServiceAccountToken": False, "enableServiceLinks": False, "hostNetwork": False,
            "hostPID": False, "hostIPC": False, "securityContext": security,
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [apart]}}}  # fmt: skip


def render(
    manifest: Manifest, *, owner: str, bundle_dir: Path, bundle_ip: str | None = None
) -> list[dict[str, Any]]:
    """Every object of the bottle, in the order `up` applies them: policies before any Pod exists, and the
    agent's Pod before the bundle's, whose config names the agent's Pod IP as its one client."""
    slug, config = manifest.slug, manifest.kubernetes
    name, namespace = base_name(slug), namespace_name(manifest)
    files = data_files(bundle_dir)

    def meta(suffix: str, role: str) -> dict[str, Any]:
        return _meta(f"{name}-{suffix}", namespace, slug, owner, role)

    def data(suffix: str) -> dict[str, str]:
        return {key: from_file(path) for (which, key), path in files.items() if which == suffix}

    objects: list[dict[str, Any]] = []
    if config.namespace is None:
        ns_meta = _meta(namespace, namespace, slug, owner, "namespace")
        del ns_meta["namespace"]
        ns_meta["labels"] |= RESTRICTED
        objects.append({"apiVersion": "v1", "kind": "Namespace", "metadata": ns_meta})
    proxy_port = [{"protocol": "TCP", "port": sidecar.PROXY_PORT}]
    objects.append({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta("agent", AGENT),
        "spec": {
            "podSelector": _selector(slug, owner, AGENT),
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": [{"to": [{"podSelector": _selector(slug, owner, BUNDLE)}], "ports": proxy_port}],
        },
    })  # fmt: skip
    objects.append({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta("bundle", BUNDLE),
        "spec": {
            "podSelector": _selector(slug, owner, BUNDLE),
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": _selector(slug, owner, AGENT)}], "ports": proxy_port}],
            "egress": [
                {"to": egress_blocks(config.cluster_cidrs), "ports": egress_ports(manifest)},
                {"to": CLUSTER_DNS, "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
            ],
        },
    })  # fmt: skip
    objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": meta("bundle-keys", BUNDLE), "type": "Opaque",
                    "stringData": data("bundle-keys")})  # fmt: skip
    objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("ca", AGENT), "data": data("ca")})
    objects.append({
        "apiVersion": "v1", "kind": "Service", "metadata": meta("bundle", BUNDLE),
        "spec": {"type": "ClusterIP", "selector": _selector(slug, owner, BUNDLE)["matchLabels"],
                 "ports": [{"name": "proxy", "protocol": "TCP", "port": sidecar.PROXY_PORT,
                            "targetPort": sidecar.PROXY_PORT}]},  # fmt: skip
    })  # fmt: skip
    objects.append(agent_pod(manifest, meta("agent", AGENT), f"{name}-ca", bundle_ip or UNASSIGNED_IP, owner))
    objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("bundle", BUNDLE), "data": data("bundle")})
    objects.append(bundle_pod(manifest, meta("bundle", BUNDLE), f"{name}-bundle", f"{name}-bundle-keys", owner))
    return objects


def bundle_pod(manifest: Manifest, metadata: dict[str, Any], config_map: str, secret: str, owner: str) -> dict[str, Any]:
    """The proxy: /etc/bottle is the ConfigMap's policy and the Secret's CA and credentials, read-only."""
    security = _pod_security(BUNDLE_USER, BUNDLE_USER)
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
        "spec": _pod_spec(security, manifest.slug, owner, AGENT) | {
            "restartPolicy": "Always",
            "containers": [{
                "name": BUNDLE,
                "image": manifest.bundle.image,
                "imagePullPolicy": "IfNotPresent",
                "env": [{"name": "HOME", "value": "/tmp"}],
                "ports": [{"name": "proxy", "containerPort": sidecar.PROXY_PORT, "protocol": "TCP"}],
                "readinessProbe": {"tcpSocket": {"port": sidecar.PROXY_PORT}, "periodSeconds": 2},
                "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}},
                "securityContext": HARDENED,
                "volumeMounts": [{"name": "config", "mountPath": "/etc/bottle", "readOnly": True},
                                 {"name": "tmp", "mountPath": "/tmp"}],  # fmt: skip
            }],
            "volumes": [
                {"name": "config", "projected": {"defaultMode": 0o440, "sources": [
                    {"configMap": {"name": config_map, "items": [{"key": CONFIG_FILE, "path": CONFIG_FILE}]}},
                    {"secret": {"name": secret, "items": [{"key": CA_FILE, "path": f"{CA_DIR}/{CA_FILE}"},
                                                          {"key": SECRETS_FILE, "path": SECRETS_FILE}]}},
                ]}},
                {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
            ],
        },
    }  # fmt: skip


def agent_pod(manifest: Manifest, metadata: dict[str, Any], ca_config_map: str, bundle_ip: str,
              owner: str) -> dict[str, Any]:  # fmt: skip
    """The agent: its command with a terminal to attach to, the CA certificate alone, nothing of the node's.

    It restarts when its command ends (a new shell for the next attach), so its Pod, and the Pod's IP that
    the bundle serves alone, last until `down`.
    """
    config = manifest.kubernetes
    uid, gid = (int(part) for part in config.user.split(":"))
    env = {"HOME": WORKDIR} | sidecar.agent_env(manifest.agent.env | sidecar.placeholders(manifest), bundle_ip)
    spec = _pod_spec(_pod_security(uid, gid), manifest.slug, owner, BUNDLE) | {
        "restartPolicy": "Always",
        # No DNS: the resolver asks the Pod's own loopback, where nothing answers; names are the bundle's job.
        "dnsPolicy": "None",
        "dnsConfig": {"nameservers": ["127.0.0.1"]},
        "containers": [{
            "name": AGENT,
            "image": manifest.agent.image,
            "imagePullPolicy": "IfNotPresent",
            "command": manifest.agent.command,
            "stdin": True,
            "tty": True,
            "workingDir": WORKDIR,
            "env": [{"name": key, "value": value} for key, value in sorted(env.items())],
            "resources": {"requests": dict(config.requests), "limits": dict(config.limits)},
            "securityContext": HARDENED,
            "volumeMounts": [{"name": "ca", "mountPath": sidecar.GUEST_DIR, "readOnly": True},
                             {"name": "tmp", "mountPath": "/tmp"}, {"name": "workspace", "mountPath": WORKDIR}],
        }],
        "volumes": [
            {"name": "ca", "configMap": {"name": ca_config_map, "defaultMode": 0o444,
                                         "items": [{"key": "ca.pem", "path": "ca.pem"}]}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "512Mi"}},
            {"name": "workspace", "emptyDir": {"sizeLimit": "4Gi"}},
        ],
    }  # fmt: skip
    if config.runtime_class is not None:
        spec["runtimeClassName"] = config.runtime_class
    if config.user_namespaces:
        spec["hostUsers"] = False
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
