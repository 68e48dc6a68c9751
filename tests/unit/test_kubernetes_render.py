"""The kubernetes backend's objects, offline: valid for current Kubernetes releases, and confining."""

import json
import os
from ipaddress import ip_network
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from bottle.backends.kubernetes.render import render
from bottle.bundle.policy import NEVER
from bottle.cli import main
from bottle.manifest import DEFAULT_CLUSTER_CIDRS, parse_manifest

EXAMPLE = Path(__file__).parents[2] / "examples" / "kubernetes.toml"
OWNER = "0123456789abcdef0123456789abcdef"
SCHEMAS = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
# Every release kubernetes-validate ships schemas for, from 1.30 on (the API server in the integration
# tests is 1.20, too old to judge). 1.30 added the Pod's appArmorProfile; older servers drop that field.
VERSIONS = sorted(
    (d.name.removeprefix("v").removesuffix("-local") for d in SCHEMAS.iterdir()
     if d.name.endswith("-local") and tuple(map(int, d.name[1:].split(".")[:2])) >= (1, 30)),
    key=lambda v: tuple(map(int, v.split("."))),
)  # fmt: skip


def manifest(**kubernetes):
    return parse_manifest({
        "name": "demo", "backend": "kubernetes",
        "agent": {"image": "agent:1", "command": ["claude"], "env": {"A": "1"}},
        "egress": {"allow": ["api.anthropic.com", {"host": "pypi.org", "ports": [443, 8443]}],
                   "credentials": [{"host": "api.anthropic.com", "header": "x-api-key", "from_env": "ANTHROPIC_API_KEY",
                                    "agent_placeholder": "ANTHROPIC_API_KEY"}]},
        "kubernetes": kubernetes,
    })  # fmt: skip


def objects(**kubernetes):
    rendered = render(manifest(**kubernetes), owner=OWNER, bundle_dir=Path("/state/demo/bundle"), bundle_ip="10.96.7.7")
    return {(o["kind"], o["metadata"]["name"]): o for o in rendered}


def test_the_schema_list_is_not_empty():
    assert len(VERSIONS) >= 8 and VERSIONS[-1].startswith("1.3"), VERSIONS


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("settings", [{}, {"runtime_class": "gvisor", "namespace": "agents", "user": "1000:1000",
                                           "user_namespaces": True}])
def test_every_object_is_valid_for_current_kubernetes_releases(version, settings):
    for obj in objects(**settings).values():
        kubernetes_validate.validate(obj, version, strict=True)  # raises on an unknown or wrong field


def test_every_object_carries_the_bottles_labels_and_a_role():
    for obj in objects().values():
        found = obj["metadata"]["labels"]
        assert {k: found[k] for k in ("bottle.managed", "bottle.slug", "bottle.backend", "bottle.owner")} == {
            "bottle.managed": "true", "bottle.slug": "demo", "bottle.backend": "kubernetes", "bottle.owner": OWNER
        }  # fmt: skip
        assert found["bottle.role"]


def test_the_agent_sends_only_to_its_bundle_on_8888_and_receives_nothing():
    policy = objects()[("NetworkPolicy", "bottle-demo-agent")]["spec"]
    agent_labels = objects()[("Pod", "bottle-demo-agent")]["metadata"]["labels"]
    bundle_labels = objects()[("Pod", "bottle-demo-bundle")]["metadata"]["labels"]
    assert policy["podSelector"] == {"matchLabels": agent_labels}
    assert policy["policyTypes"] == ["Ingress", "Egress"] and policy["ingress"] == []
    assert policy["egress"] == [{"to": [{"podSelector": {"matchLabels": bundle_labels}}],
                                 "ports": [{"protocol": "TCP", "port": 8888}]}]  # fmt: skip


def test_the_bundle_hears_only_its_agent_and_sends_nowhere_in_the_cluster():
    policy = objects()[("NetworkPolicy", "bottle-demo-bundle")]["spec"]
    agent_labels = objects()[("Pod", "bottle-demo-agent")]["metadata"]["labels"]
    assert policy["ingress"] == [{"from": [{"podSelector": {"matchLabels": agent_labels}}],
                                  "ports": [{"protocol": "TCP", "port": 8888}]}]  # fmt: skip
    internet, dns = policy["egress"]
    assert internet["ports"] == [{"protocol": "TCP", "port": p} for p in (80, 443, 8443)]  # the allowlist's
    blocks = [peer["ipBlock"] for peer in internet["to"]]
    assert [b["cidr"] for b in blocks] == ["0.0.0.0/0", "::/0"]
    shut = [ip_network(n) for b in blocks for n in b["except"]]
    for network in [*map(ip_network, DEFAULT_CLUSTER_CIDRS), *NEVER, ip_network("64:ff9b::/96")]:
        assert any(network.subnet_of(s) for s in shut if s.version == network.version), network
    for address in ["169.254.169.254", "fd00:ec2::254", "168.63.129.16", "100.100.100.200", "10.96.0.1"]:
        assert any(ip_network(address).subnet_of(s) for s in shut if s.version == ip_network(address).version)
    assert all(p["port"] == 53 for p in dns["ports"])  # the cluster's DNS, and nothing else of it


def test_the_cluster_ranges_are_the_manifests():
    policy = objects(cluster_cidrs=["10.8.0.0/16"])[("NetworkPolicy", "bottle-demo-bundle")]["spec"]
    v4 = policy["egress"][0]["to"][0]["ipBlock"]["except"]
    assert "10.8.0.0/16" in v4 and "192.168.0.0/16" not in v4


def test_the_agent_pod_has_nothing_of_the_node_and_no_way_to_the_api():
    spec = objects(runtime_class="gvisor")[("Pod", "bottle-demo-agent")]["spec"]
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    assert not (spec["hostNetwork"] or spec["hostPID"] or spec["hostIPC"])
    assert spec["runtimeClassName"] == "gvisor"
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 65534
    assert spec["dnsPolicy"] == "None" and spec["dnsConfig"] == {"nameservers": ["127.0.0.1"]}
    [container] = spec["containers"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "privileged": False,
                                            "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
                                            "runAsNonRoot": True}  # fmt: skip
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HTTPS_PROXY"] == env["http_proxy"] == "http://10.96.7.7:8888"  # an IP literal: no DNS needed
    assert env["ANTHROPIC_API_KEY"] == "bottle-placeholder-the-bundle-adds-the-real-key"
    # The CA certificate is all it mounts of bottle's: never the Secret.
    assert [v for v in spec["volumes"] if "emptyDir" not in v] == [
        {"name": "ca", "configMap": {"name": "bottle-demo-ca", "defaultMode": 0o444, "items": [{"key": "ca.pem", "path": "ca.pem"}]}}
    ]  # fmt: skip
    assert all(v["emptyDir"].get("sizeLimit") for v in spec["volumes"] if "emptyDir" in v)


def test_user_namespaces_are_asked_for_only_when_the_manifest_does():
    assert "hostUsers" not in objects()[("Pod", "bottle-demo-agent")]["spec"]
    assert objects(user_namespaces=True)[("Pod", "bottle-demo-agent")]["spec"]["hostUsers"] is False


def test_only_the_bundle_mounts_the_secret_and_no_value_is_in_the_plan(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-never-in-a-plan")
    rendered = objects()
    mounts = [o["metadata"]["name"] for o in rendered.values() if "bottle-demo-bundle-keys" in json.dumps(o.get("spec", {}))]
    assert mounts == ["bottle-demo-bundle"]
    secret = rendered[("Secret", "bottle-demo-bundle-keys")]["stringData"]
    assert secret == {"mitmproxy-ca.pem": "(read from /state/demo/bundle/ca/mitmproxy-ca.pem by bottle up)",
                      "secrets.json": "(read from /state/demo/bundle/secrets.json by bottle up)"}  # fmt: skip
    assert "sk-ant-never-in-a-plan" not in json.dumps(list(rendered.values()))


def test_policies_come_before_pods_and_the_agent_before_the_bundles_config():
    order = [kind + " " + name for kind, name in objects()]
    assert order == [
        "Namespace bottle-demo", "NetworkPolicy bottle-demo-agent", "NetworkPolicy bottle-demo-bundle",
        "Secret bottle-demo-bundle-keys", "ConfigMap bottle-demo-ca", "Service bottle-demo-bundle",
        "Pod bottle-demo-agent", "ConfigMap bottle-demo-bundle", "Pod bottle-demo-bundle",
    ]  # fmt: skip
    namespace = objects()[("Namespace", "bottle-demo")]["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"


def test_a_shared_namespace_gets_no_namespace_object():
    rendered = objects(namespace="agents")
    assert "Namespace" not in {kind for kind, _ in rendered}
    assert {o["metadata"]["namespace"] for o in rendered.values()} == {"agents"}


def test_plan_yaml_needs_no_cluster_and_shows_every_object(capsys):
    assert not os.path.exists(os.environ["KUBECONFIG"])
    code = main(["plan", "-f", str(EXAMPLE), "--yaml"])
    out, err = capsys.readouterr()
    assert code == 0, err
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["Namespace", "NetworkPolicy", "NetworkPolicy", "Secret", "ConfigMap",
                                         "Service", "Pod", "ConfigMap", "Pod"]  # fmt: skip
    assert "bottle doctor" in err  # no cluster: the plan is shown, with a note


def test_plan_yaml_of_a_docker_bottle_says_what_to_use_instead(capsys, mocker):
    from bottle.testing import FakeDocker

    mocker.patch("bottle.cli.docker_client", return_value=FakeDocker())
    example = Path(__file__).parents[2] / "examples" / "docker.toml"
    assert main(["plan", "-f", str(example), "--yaml"]) == 2
    assert "makes no Kubernetes objects; `bottle plan --json` shows its plan" in capsys.readouterr().err


@pytest.mark.parametrize(
    "table, message",
    [
        ({"user": "0:0"}, "kubernetes.user: must be a uid:gid from 1 to 2147483647"),
        ({"namespace": "Has_Caps"}, "kubernetes.namespace: 'Has_Caps' is not a Kubernetes name"),
        ({"limits": {"memory": "lots"}}, "kubernetes.limits.memory: 'lots' is not a Kubernetes quantity"),
        ({"cluster_cidrs": ["10.0.0.1/8"]}, "kubernetes.cluster_cidrs: 10.0.0.1/8 has host bits set"),
        ({"runtime_class": ""}, "kubernetes.runtime_class: '' is not a Kubernetes name"),
        ({"contexts": "x"}, "kubernetes.contexts: unknown key; allowed here: cluster_cidrs, context, limits"),
    ],
)
def test_bad_kubernetes_settings_are_one_line_and_exit_2(capsys, tmp_path, table, message):
    import tomli_w

    path = tmp_path / "bottle.toml"
    path.write_text(tomli_w.dumps({"name": "x", "backend": "kubernetes", "agent": {"image": "a"}, "kubernetes": table}))
    assert main(["plan", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
