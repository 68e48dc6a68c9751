"""The kubernetes backend's confinement, shown from inside a running agent on a real cluster.

The cluster's network plugin is what enforces a NetworkPolicy, so only a running bottle can show that it
does. The suite brings one bottle up (the cluster pulls BOTTLE_TEST_BUNDLE_IMAGE and the agent image),
and a decoy in a namespace of its own (an HTTP server on 8080, from the agent image), then from inside
the agent checks that:

- the bundle's proxy answers, and refuses a host not on the allowlist, a raw IP and the decoy, with 403;
- nothing else is reached: the decoy by Pod IP or Service, the bundle's Pod on any port but 8888 (its
  DNS refuser's port included), the Kubernetes API, the node (kubelet), cloud metadata, the cluster DNS;
- names resolve to nothing, and no credential is anywhere in the agent's environment or files;

and from the decoy, that the bundle's proxy does not serve it. Nothing leaves the cluster: the allowlist
holds one name, `allowed.bottle.invalid`, which resolves nowhere.

Not observed on the machines bottle is developed on (no kubelet there): see the README.
"""

import json
import os
import secrets
import time
import uuid

import kubernetes
import pytest

from bottle.backends.kubernetes import KubernetesBackend
from bottle.backends.kubernetes.cluster import Cluster
from bottle.manifest import parse_manifest
from bottle.state import StateStore
from bottle.testing.confinement import PROBE

SECRET_ENV = "BOTTLE_CONFINEMENT_SECRET"
ALLOWED = "allowed.bottle.invalid"


@pytest.fixture(scope="module")
def bottle(cluster_settings, tmp_path_factory):
    run_id = f"conf-{uuid.uuid4().hex[:8]}"
    secret = f"bottle-secret-{secrets.token_hex(16)}"
    os.environ[SECRET_ENV] = secret
    os.environ["KUBECONFIG"] = cluster_settings["kubeconfig"]
    state = StateStore(tmp_path_factory.mktemp("home"))
    backend = KubernetesBackend()
    cluster = Cluster.connect(cluster_settings["context"])
    core = kubernetes.client.CoreV1Api(cluster.api_client)
    decoy_ns = f"{run_id}-decoy"
    manifest = parse_manifest({
        "name": run_id, "backend": "kubernetes",
        "agent": {"image": cluster_settings["agent_image"], "command": ["sleep", "infinity"]},
        "egress": {"allow": [ALLOWED],
                   "credentials": [{"host": ALLOWED, "header": "x-bottle-confinement", "from_env": SECRET_ENV}]},
        "bundle": {"image": cluster_settings["bundle_image"]},
        "kubernetes": {"context": cluster_settings["context"]},
    })  # fmt: skip
    try:
        core.create_namespace({"metadata": {"name": decoy_ns, "labels": {"bottle.test": run_id}}})
        decoy = {"metadata": {"name": "decoy", "labels": {"app": "decoy"}}, "spec": {
            "automountServiceAccountToken": False,
            "containers": [{"name": "decoy", "image": cluster_settings["agent_image"],
                            "command": ["python3", "-m", "http.server", "8080"], "ports": [{"containerPort": 8080}]}]}}
        core.create_namespaced_pod(decoy_ns, decoy)
        core.create_namespaced_service(decoy_ns, {"metadata": {"name": "decoy"}, "spec": {
            "selector": {"app": "decoy"}, "ports": [{"port": 8080, "targetPort": 8080}]}})  # fmt: skip
        report = backend.preflight(docker=None, manifest=manifest)
        assert report.ok, report.problems
        plan = backend.up(manifest, docker=None, state=state, preflight=report, on_step=lambda s, d: None)
        deadline = time.monotonic() + 120
        while core.read_namespaced_pod("decoy", decoy_ns).status.phase != "Running":
            assert time.monotonic() < deadline, "the decoy Pod did not start"
            time.sleep(1)
        pods = {role: core.read_namespaced_pod(f"bottle-{run_id}-{role}", plan.namespace) for role in ("agent", "bundle")}
        yield {
            "backend": backend, "plan": plan, "secret": secret, "core": core, "decoy_ns": decoy_ns,
            "decoy_ip": core.read_namespaced_pod("decoy", decoy_ns).status.pod_ip,
            "decoy_service": core.read_namespaced_service("decoy", decoy_ns).spec.cluster_ip,
            "api_service": core.read_namespaced_service("kubernetes", "default").spec.cluster_ip,
            "bundle_pod_ip": pods["bundle"].status.pod_ip, "node_ip": pods["agent"].status.host_ip,
            "dns_service": _cluster_dns(core),
        }  # fmt: skip
    finally:
        os.environ.pop(SECRET_ENV, None)
        backend.down(run_id, docker=None, state=state)
        core.delete_namespace(decoy_ns)


def _cluster_dns(core) -> str | None:
    found = core.list_namespaced_service("kube-system", label_selector="k8s-app=kube-dns").items
    return found[0].spec.cluster_ip if found else None


def probe(bottle, **op):
    code, out = bottle["backend"].run(bottle["plan"], ["python3", "-c", PROBE, json.dumps(op)], docker=None, timeout=60)
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])


def refused(result: str) -> bool:
    return result != "open"


def test_the_proxy_answers_and_refuses_what_is_not_allowlisted(bottle):
    for url in ["http://not-allowed.bottle.invalid/", "https://not-allowed.bottle.invalid/",
                f"http://{bottle['decoy_ip']}:8080/", "http://1.1.1.1/"]:  # fmt: skip
        assert probe(bottle, op="get", url=url).get("status") == 403, url


def test_the_decoy_is_not_reached_directly(bottle):
    assert refused(probe(bottle, op="tcp", host=bottle["decoy_ip"], port=8080))
    assert refused(probe(bottle, op="tcp", host=bottle["decoy_service"], port=8080))


def test_the_bundle_is_reached_on_its_proxy_port_alone(bottle):
    assert probe(bottle, op="tcp", host=bottle["plan"].bundle_ip, port=8888) == "open"
    for port in (22, 53, 80, 443, 8853, 9090):
        assert refused(probe(bottle, op="tcp", host=bottle["bundle_pod_ip"], port=port)), port


def test_the_cluster_and_the_node_are_not_reached(bottle):
    targets = [(bottle["api_service"], 443), (bottle["node_ip"], 10250), (bottle["node_ip"], 22),
               ("169.254.169.254", 80), ("10.96.0.1", 443)]  # fmt: skip
    if bottle["dns_service"]:
        targets.append((bottle["dns_service"], 53))
    for host, port in targets:
        assert refused(probe(bottle, op="tcp", host=host, port=port)), (host, port)


def test_names_resolve_to_nothing_and_no_dns_server_answers(bottle):
    assert isinstance(probe(bottle, op="resolve", name="kubernetes.default.svc.cluster.local"), str)
    for server in filter(None, [bottle["dns_service"], "169.254.20.10", bottle["bundle_pod_ip"]]):
        assert "error" in probe(bottle, op="dns", server=server, name="example.com"), server


def test_the_credential_is_nowhere_in_the_agent(bottle):
    half = len(bottle["secret"]) // 2
    assert probe(bottle, op="find", head=bottle["secret"][:half], tail=bottle["secret"][half:]) == []


def test_the_bundle_serves_no_one_but_its_agent(bottle):
    """From the decoy's Pod, another namespace: the bundle's NetworkPolicy (and its client list) keep it out."""
    from kubernetes.stream import stream

    command = ["python3", "-c", f"import socket; socket.create_connection(('{bottle['plan'].bundle_ip}', 8888), timeout=5)"]
    output = stream(bottle["core"].connect_get_namespaced_pod_exec, "decoy", bottle["decoy_ns"], command=command,
                    stderr=True, stdin=False, stdout=True, tty=False)  # fmt: skip
    assert "Error" in output or "timed out" in output, output
