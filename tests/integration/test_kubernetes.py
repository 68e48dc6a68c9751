"""The kubernetes backend against a real kube-apiserver (v1.20.2) with etcd, on loopback.

What is real: every object is sent to the API server, which validates, defaults and stores it, assigns
the Service its ClusterIP, and answers RBAC reviews. What is not: there is no kubelet, so the tests play
it (`play_kubelet` reports a Pod running, with an IP, and ready), and nothing runs in a Pod; no namespace
controller, so a deleted Namespace stays Terminating. The confinement of a running bottle is shown on a
real cluster by tests/cluster (see the README).
"""

import base64
import json
import os
import threading
import uuid
from pathlib import Path

import kubernetes
import pytest
import tomli_w
import yaml

from bottle.backends.kubernetes.cluster import KINDS
from bottle.backends.kubernetes.launch import NO_OWNER, differences
from bottle.backends.kubernetes.render import UNASSIGNED_IP
from bottle.cli import main
from bottle.state import StateStore
from bottle.testing.kube_apiserver import NOBODY, play_kubelet

pytestmark = pytest.mark.integration
SECRET = "kube-test-secret-" + uuid.uuid4().hex
# Fields the v1.20 API server does not know yet and drops; tests/unit/test_kubernetes_render.py
# validates them against the schemas of current releases.
DROPPED_BY_1_20 = frozenset({"appArmorProfile"})


@pytest.fixture(autouse=True)
def _kubernetes_only(mocker):
    """These tests are about the cluster: `ls`, `gc` and `down` ask the kubernetes backend alone, so
    containers of other tests cannot change what they print."""
    from bottle import registry

    installed = registry.available()
    mocker.patch.object(registry, "available", return_value={"kubernetes": installed["kubernetes"]})


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def name(kube):
    """A bottle name of the test's own; whatever carries it is deleted afterwards (the tests share one API
    server, and a leftover would show in every later test's `ls`)."""
    value = f"k8s-{uuid.uuid4().hex[:10]}"
    yield value
    sweep(kube, value)


def sweep(kube, slug: str) -> None:
    from bottle.backends.kubernetes.cluster import Cluster

    cluster = Cluster(kube, "bottle-test")
    for (kind, item_name), item in objects_of(kube, slug).items():
        cluster.delete(kind, item_name, item["metadata"].get("namespace"), item["metadata"]["uid"])


@pytest.fixture
def core(kube):
    return kubernetes.client.CoreV1Api(kube)


@pytest.fixture
def kubelet(core, name):
    """Play the kubelet for the bottle's namespace: its Pods run, get an IP, and are ready."""
    stop = threading.Event()
    play_kubelet(core, f"bottle-{name}", stop)
    yield
    stop.set()


def write_manifest(tmp_path: Path, name: str, **kubernetes_table) -> Path:
    path = tmp_path / f"{name}.toml"
    data = {
        "name": name, "backend": "kubernetes",
        "agent": {"image": "python:3.12-slim", "command": ["bash"], "env": {"TERM": "xterm"}},
        "egress": {"allow": ["pypi.org", {"host": "api.example.com", "ports": [443]}],
                   "credentials": [{"host": "api.example.com", "header": "x-api-key", "from_env": "BOTTLE_K8S_TEST_KEY"}]},
        "kubernetes": kubernetes_table,
    }  # fmt: skip
    path.write_text(tomli_w.dumps(data))
    return path


def objects_of(kube, slug: str) -> dict[tuple[str, str], dict]:
    """Every object of the six kinds labelled with the bottle's slug, by (kind, name), in any namespace."""
    from bottle.backends.kubernetes.cluster import Cluster

    cluster = Cluster(kube, "bottle-test")
    found = {}
    for kind in KINDS:
        for item in cluster.list(kind, f"bottle.slug={slug}"):
            if not item["metadata"].get("deletionTimestamp"):
                found[(kind, item["metadata"]["name"])] = item
    return found


def test_up_creates_exactly_the_objects_the_plan_showed_and_down_removes_them(capsys, kube, kubelet, name, tmp_path,
                                                                              monkeypatch):  # fmt: skip
    monkeypatch.setenv("BOTTLE_K8S_TEST_KEY", SECRET)
    path = write_manifest(tmp_path, name)
    code, out, err = run(capsys, "plan", "-f", str(path), "--yaml")
    assert code == 0, err
    shown = [doc for doc in yaml.safe_load_all(out)]
    assert objects_of(kube, name) == {}, "plan created something"

    code, out, err = run(capsys, "up", "--detach", "-f", str(path))
    assert code == 0, err
    plan = json.loads((Path(StateStore().bottle_dir(name)) / "plan.json").read_text())
    ip = plan["bundle_ip"]
    assert ip and ip != UNASSIGNED_IP
    # The plan shown before `up` is what `up` applied, but for the ClusterIP the API server chose and the
    # owner id that the first `up` under a state directory makes.
    owner = StateStore().owner()
    expected = json.dumps(shown).replace(f"http://{UNASSIGNED_IP}:", f"http://{ip}:").replace(NO_OWNER, owner)
    assert json.loads(expected) == plan["objects"]

    found = objects_of(kube, name)
    assert sorted(found) == sorted((o["kind"], o["metadata"]["name"]) for o in plan["objects"])
    files = {p.name: p.read_text() for p in StateStore().bottle_dir(name).rglob("*") if p.is_file()}
    for obj in plan["objects"]:
        held = found[(obj["kind"], obj["metadata"]["name"])]
        if obj["kind"] == "Secret":
            values = {k: base64.b64decode(v).decode() for k, v in held["data"].items()}
            assert sorted(values) == sorted(obj["stringData"])
            assert json.loads(values["secrets.json"]) == {"credential-0": SECRET}
            assert values["mitmproxy-ca.pem"] == files["mitmproxy-ca.pem"]
            continue
        if obj["kind"] == "ConfigMap":
            assert all(held["data"][key] == files[key.replace("ca.pem", "ca.pem")] for key in obj["data"]), obj
            continue
        rendered = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
        assert differences(held, rendered, dropped=DROPPED_BY_1_20) == [], obj["kind"]
    config = json.loads(found[("ConfigMap", f"bottle-{name}-bundle")]["data"]["config.json"])
    agent_ip = found[("Pod", f"bottle-{name}-agent")]["status"]["podIP"]
    assert config["clients"] == [f"{agent_ip}/32"]  # the bundle serves its agent's Pod alone
    assert SECRET not in json.dumps(plan) and SECRET not in out + err

    code, out, err = run(capsys, "down", name)
    assert code == 0, err
    assert objects_of(kube, name) == {}
    assert not StateStore().bottle_dir(name).exists()
    namespace = kubernetes.client.CoreV1Api(kube).read_namespace(f"bottle-{name}")
    assert namespace.metadata.deletion_timestamp is not None  # no namespace controller here to finish it


def test_the_example_comes_up_as_its_plan_showed_and_down_removes_it(capsys, kube, core):
    """`bottle up -f examples/kubernetes.toml` word for word (detached: no terminal can be attached here)."""
    example = str(Path(__file__).parents[2] / "examples" / "kubernetes.toml")
    stop = threading.Event()
    play_kubelet(core, "bottle-kube-demo", stop)
    try:
        code, out, err = run(capsys, "plan", "-f", example, "--yaml")
        assert code == 0, err
        shown = list(yaml.safe_load_all(out))
        assert run(capsys, "up", "-d", "-f", example)[0] == 0
        ip = json.loads((StateStore().bottle_dir("kube-demo") / "plan.json").read_text())["bundle_ip"]
        expected = json.loads(json.dumps(shown).replace(f"http://{UNASSIGNED_IP}:", f"http://{ip}:")
                              .replace(NO_OWNER, StateStore().owner()))  # fmt: skip
        found = objects_of(kube, "kube-demo")
        assert sorted(found) == sorted((o["kind"], o["metadata"]["name"]) for o in expected)
        for obj in expected:
            if obj["kind"] not in ("Secret", "ConfigMap"):  # their values are files' (the test above reads them)
                held = found[(obj["kind"], obj["metadata"]["name"])]
                rendered = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
                assert differences(held, rendered, dropped=DROPPED_BY_1_20) == [], obj["kind"]
        code, out, err = run(capsys, "down", "kube-demo")
        assert code == 0 and out.count("removed ") == 10, out  # nine objects and the state directory
        assert objects_of(kube, "kube-demo") == {}
    finally:
        stop.set()
        sweep(kube, "kube-demo")


def test_up_of_a_running_bottle_changes_nothing(capsys, kube, kubelet, name, tmp_path, monkeypatch):
    monkeypatch.setenv("BOTTLE_K8S_TEST_KEY", SECRET)
    path = write_manifest(tmp_path, name)
    assert run(capsys, "up", "-d", "-f", str(path))[0] == 0
    before = {key: item["metadata"]["resourceVersion"] for key, item in objects_of(kube, name).items()}
    code, _, err = run(capsys, "up", "-d", "-f", str(path))
    assert code == 0, err
    after = objects_of(kube, name)
    pods = {key for key in after if key[0] == "Pod"}
    # Pod statuses move (the kubelet's part); what bottle made must not.
    assert {k: v for k, v in before.items() if k not in pods} == {
        key: item["metadata"]["resourceVersion"] for key, item in after.items() if key not in pods
    }
    assert {k: after[k]["metadata"]["uid"] for k in pods} == {k: after[k]["metadata"]["uid"] for k in pods}
    assert run(capsys, "down", name)[0] == 0


def test_a_changed_credential_makes_the_bundle_anew_and_keeps_the_agent(capsys, kube, kubelet, name, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    monkeypatch.setenv("BOTTLE_K8S_TEST_KEY", SECRET)
    path = write_manifest(tmp_path, name)
    assert run(capsys, "up", "-d", "-f", str(path))[0] == 0
    before = objects_of(kube, name)
    monkeypatch.setenv("BOTTLE_K8S_TEST_KEY", SECRET + "-rotated")
    assert run(capsys, "up", "-d", "-f", str(path))[0] == 0
    after = objects_of(kube, name)
    uid = lambda found, role: found[("Pod", f"bottle-{name}-{role}")]["metadata"]["uid"]  # noqa: E731
    assert uid(after, "bundle") != uid(before, "bundle")
    assert uid(after, "agent") == uid(before, "agent")
    secret = after[("Secret", f"bottle-{name}-bundle-keys")]["data"]["secrets.json"]
    assert json.loads(base64.b64decode(secret)) == {"credential-0": SECRET + "-rotated"}
    assert run(capsys, "down", name)[0] == 0


def test_a_bundle_that_never_gets_ready_fails_up_and_leaves_nothing(capsys, kube, core, name, tmp_path, monkeypatch):
    monkeypatch.setenv("BOTTLE_K8S_TEST_KEY", SECRET)
    monkeypatch.setenv("BOTTLE_READY_TIMEOUT", "3")
    stop = threading.Event()
    play_kubelet(core, f"bottle-{name}", stop, ready=False)  # running, never ready
    try:
        code, _, err = run(capsys, "up", "-d", "-f", str(write_manifest(tmp_path, name)))
    finally:
        stop.set()
    assert code == 1
    assert f"step 'bundle ready' failed: Pod bottle-{name}-bundle was not ready within 3 s" in err
    assert "BOTTLE_READY_TIMEOUT" in err and "what this run created was removed" in err
    assert len(err.strip().splitlines()) == 6, err  # the progress lines, then one sentence
    assert "(running, but its readiness check does not pass)" in err
    assert objects_of(kube, name) == {}
    assert not StateStore().bottle_dir(name).exists()


def test_a_pod_that_is_never_scheduled_times_out_with_a_sentence(capsys, kube, name, tmp_path, monkeypatch):
    monkeypatch.setenv("BOTTLE_K8S_TEST_KEY", SECRET)
    monkeypatch.setenv("BOTTLE_READY_TIMEOUT", "2")
    code, _, err = run(capsys, "up", "-d", "-f", str(write_manifest(tmp_path, name)))
    assert code == 1
    assert (f"step 'agent' failed: Pod bottle-{name}-agent was not running within 2 s (phase Pending, not yet "
            "assigned to a node)") in err  # fmt: skip
    assert objects_of(kube, name) == {}


def test_a_namespace_bottle_did_not_make_is_refused_and_left_alone(capsys, kube, core, name, tmp_path, monkeypatch):
    monkeypatch.setenv("BOTTLE_K8S_TEST_KEY", SECRET)
    core.create_namespace({"metadata": {"name": f"bottle-{name}", "labels": {"team": "theirs"}}})
    code, _, err = run(capsys, "up", "-d", "-f", str(write_manifest(tmp_path, name)))
    assert code == 1
    assert f"Namespace bottle-{name} exists but this bottle state directory did not make it" in err
    assert core.read_namespace(f"bottle-{name}").metadata.labels == {"team": "theirs"}
    assert objects_of(kube, name) == {} and not StateStore().bottle_dir(name).exists()


def test_an_object_the_api_server_refuses_stops_up_with_its_reason(capsys, kube, name, tmp_path, monkeypatch):
    monkeypatch.setenv("BOTTLE_K8S_TEST_KEY", SECRET)
    code, _, err = run(capsys, "up", "-d", "-f", str(write_manifest(tmp_path, name, namespace="no-such-namespace")))
    assert code == 1
    assert f"the API server refused NetworkPolicy bottle-{name}-agent: namespaces \"no-such-namespace\" not found (HTTP 404)" in err
    assert objects_of(kube, name) == {} and not StateStore().bottle_dir(name).exists()


def test_a_missing_secret_stops_up_before_anything_is_sent(capsys, kube, name, tmp_path, monkeypatch):
    monkeypatch.delenv("BOTTLE_K8S_TEST_KEY", raising=False)
    code, _, err = run(capsys, "up", "-d", "-f", str(write_manifest(tmp_path, name)))
    assert code == 1 and "$BOTTLE_K8S_TEST_KEY is not set or empty" in err
    assert objects_of(kube, name) == {}


def test_a_shared_namespace_is_used_and_kept(capsys, kube, core, kubelet, name, tmp_path, monkeypatch):
    monkeypatch.setenv("BOTTLE_K8S_TEST_KEY", SECRET)
    shared = f"shared-{name}"
    core.create_namespace({"metadata": {"name": shared}})
    stop = threading.Event()
    play_kubelet(core, shared, stop)
    try:
        assert run(capsys, "up", "-d", "-f", str(write_manifest(tmp_path, name, namespace=shared)))[0] == 0
        found = objects_of(kube, name)
        assert {item["metadata"]["namespace"] for item in found.values()} == {shared}
        assert "Namespace" not in {kind for kind, _ in found}
        assert run(capsys, "down", name)[0] == 0
    finally:
        stop.set()
    assert objects_of(kube, name) == {}
    assert core.read_namespace(shared).metadata.deletion_timestamp is None


def test_ls_shows_the_bottle_and_gc_collects_it_once_its_state_is_gone(capsys, kube, kubelet, name, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    monkeypatch.setenv("BOTTLE_K8S_TEST_KEY", SECRET)
    assert run(capsys, "up", "-d", "-f", str(write_manifest(tmp_path, name)))[0] == 0
    code, out, _ = run(capsys, "ls", "--json")
    [row] = [r for r in json.loads(out) if r["slug"] == name]
    assert (row["state"], row["backend"], row["parts"]) == (
        "running", "kubernetes", {"config": "present", "policies": "present", "bundle": "running", "agent": "running"}
    )  # fmt: skip
    StateStore().remove_bottle(name)  # a crash, or state removed by hand
    code, out, _ = run(capsys, "gc")
    assert code == 0 and f"Pod bottle-{name}-agent" in out
    assert objects_of(kube, name) == {}


def test_objects_of_another_state_directory_are_shown_as_foreign_and_never_removed(capsys, kube, kubelet, core, name,
                                                                                   tmp_path, monkeypatch):  # fmt: skip
    monkeypatch.setenv("BOTTLE_K8S_TEST_KEY", SECRET)
    assert run(capsys, "up", "-d", "-f", str(write_manifest(tmp_path, name)))[0] == 0
    home = os.environ["BOTTLE_HOME"]
    monkeypatch.setenv("BOTTLE_HOME", str(tmp_path / "another-home"))
    code, out, err = run(capsys, "gc")
    assert code == 0 and "removed" not in out
    assert f"left alone: Pod bottle-{name}-agent -n bottle-{name} carries bottle's labels but bottle has no record of making it" in err
    assert run(capsys, "down", name)[1] == f"bottle '{name}': nothing to remove\n"
    assert len(objects_of(kube, name)) == 9
    monkeypatch.setenv("BOTTLE_HOME", home)
    assert run(capsys, "down", name)[0] == 0  # the tests share one API server: leave it as it was


def test_doctor_checks_rbac_and_the_runtime_class(capsys, kube, apiserver, name, tmp_path, monkeypatch):
    path = write_manifest(tmp_path, name, runtime_class="gvisor")
    code, out, _ = run(capsys, "doctor", "-f", str(path))
    assert code == 1
    assert "  ok   rbac: allowed in namespace bottle-" in out
    assert "  FAIL runtime class: 'gvisor' among the cluster's: none" in out
    kubernetes.client.NodeV1Api(kube).create_runtime_class({"metadata": {"name": "gvisor"}, "handler": "runsc"})
    try:
        code, out, _ = run(capsys, "doctor", "-f", str(path))
        assert code == 0, out
        assert "NetworkPolicy is enforced only if the cluster's network plugin" in out
        path.write_text(path.read_text() + f'context = "{NOBODY}"\n')
        code, out, _ = run(capsys, "doctor", "-f", str(path))
        assert code == 1 and "  FAIL rbac: not allowed in namespace bottle-" in out and "create pods" in out
        code, _, err = run(capsys, "up", "-d", "-f", str(path))
        assert code == 1 and "backend 'kubernetes' is not ready on this machine" in err
    finally:
        kubernetes.client.NodeV1Api(kube).delete_runtime_class("gvisor")
    assert objects_of(kube, name) == {}


def test_an_unreachable_cluster_is_one_sentence(capsys, apiserver, name, tmp_path, monkeypatch):
    config = yaml.safe_load(apiserver.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:9"  # nothing listens on the discard port
    broken = tmp_path / "kubeconfig"
    broken.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(broken))
    code, out, err = run(capsys, "up", "-d", "-f", str(write_manifest(tmp_path, name)))
    assert code == 1
    assert "cluster: the Kubernetes API server at https://127.0.0.1:9 (context 'bottle-test') did not answer" in err
    assert "Traceback" not in err
    code, out, err = run(capsys, "ls")
    assert code == 1 and "bottle: kubernetes bottles not looked at: the Kubernetes API server at" in err


@pytest.mark.parametrize("selector", [{}, {"matchLabels": {"bottle.role": "agent"}},
                                      {"matchExpressions": [{"key": "bottle.slug", "operator": "Exists"}]}])
def test_a_shared_namespace_with_a_policy_that_selects_the_bottle_is_refused(capsys, kube, core, name, tmp_path,
                                                                             monkeypatch, selector):  # fmt: skip
    monkeypatch.setenv("BOTTLE_K8S_TEST_KEY", SECRET)
    shared = f"shared-{name}"
    core.create_namespace({"metadata": {"name": shared}})
    networking = kubernetes.client.NetworkingV1Api(kube)
    networking.create_namespaced_network_policy(shared, {
        "metadata": {"name": "allow-dns"}, "spec": {"podSelector": selector, "policyTypes": ["Egress"],
                                                    "egress": [{"ports": [{"protocol": "UDP", "port": 53}]}]},
    })  # fmt: skip
    networking.create_namespaced_network_policy(shared, {  # one that selects others only is fine
        "metadata": {"name": "web"}, "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]},
    })  # fmt: skip
    code, _, err = run(capsys, "up", "-d", "-f", str(write_manifest(tmp_path, name, namespace=shared)))
    assert code == 1
    assert f"NetworkPolicy allow-dns in namespace {shared}, which bottle did not make, also applies to" in err
    assert objects_of(kube, name) == {}


def _owner_labels(kube, name):
    """The labels of the bottle's Namespace: anyone who may list namespaces can read (and copy) them."""
    return dict(kubernetes.client.CoreV1Api(kube).read_namespace(f"bottle-{name}").metadata.labels)


def test_a_namespace_made_by_another_with_copied_labels_is_not_adopted(capsys, kube, core, kubelet, name, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    """The red team's takeover: copy the owner label from a bottle's objects onto a Namespace of one's own
    (with a RoleBinding that lets one read Secrets there), and wait for the next bottle of that state
    directory to put its credentials in it."""
    monkeypatch.setenv("BOTTLE_K8S_TEST_KEY", SECRET)
    assert run(capsys, "up", "-d", "-f", str(write_manifest(tmp_path, name)))[0] == 0
    victim = f"{name}-next"
    copied = _owner_labels(kube, name) | {"bottle.slug": victim}
    core.create_namespace({"metadata": {"name": f"bottle-{victim}", "labels": copied}})
    try:
        code, _, err = run(capsys, "up", "-d", "-f", str(write_manifest(tmp_path, victim)))
        assert code == 1
        assert f"Namespace bottle-{victim} exists but this bottle state directory did not make it" in err
        assert objects_of(kube, victim) == {f: o for f, o in objects_of(kube, victim).items() if f[0] == "Namespace"}
        # and `gc` shows it as foreign, never removes it
        code, out, err = run(capsys, "gc")
        assert f"left alone: Namespace bottle-{victim} carries bottle's labels but bottle has no record" in err
        assert core.read_namespace(f"bottle-{victim}").metadata.deletion_timestamp is None
    finally:
        core.delete_namespace(f"bottle-{victim}")
    assert run(capsys, "down", name)[0] == 0


def test_objects_changed_behind_bottles_back_are_restored_by_the_next_up(capsys, kube, core, kubelet, name, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    monkeypatch.setenv("BOTTLE_K8S_TEST_KEY", SECRET)
    path = write_manifest(tmp_path, name)
    assert run(capsys, "up", "-d", "-f", str(path))[0] == 0
    before = objects_of(kube, name)
    networking = kubernetes.client.NetworkingV1Api(kube)
    ns, base = f"bottle-{name}", f"bottle-{name}"
    networking.patch_namespaced_network_policy(f"{base}-agent", ns, {"spec": {"egress": [{}]}})  # allow everything
    core.patch_namespaced_service(f"{base}-bundle", ns, {"spec": {"selector": {"app": "evil"}}})  # one more key
    core.patch_namespaced_pod(f"{base}-bundle", ns, {"spec": {"containers": [{"name": "bundle", "image": "evil/proxy"}]}})
    core.patch_namespace(ns, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "privileged"}}})
    assert run(capsys, "up", "-d", "-f", str(path))[0] == 0
    after = objects_of(kube, name)
    assert after[("NetworkPolicy", f"{base}-agent")]["spec"]["egress"] == before[("NetworkPolicy", f"{base}-agent")]["spec"]["egress"]
    assert after[("Service", f"{base}-bundle")]["spec"]["selector"] == before[("Service", f"{base}-bundle")]["spec"]["selector"]
    assert after[("Pod", f"{base}-bundle")]["spec"]["containers"][0]["image"] == "bottle-bundle:latest"
    assert after[("Namespace", ns)]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert run(capsys, "down", name)[0] == 0


def test_down_and_gc_touch_only_what_bottle_made_whatever_carries_its_labels(capsys, kube, core, kubelet, name,
                                                                             tmp_path, monkeypatch):  # fmt: skip
    monkeypatch.setenv("BOTTLE_K8S_TEST_KEY", SECRET)
    assert run(capsys, "up", "-d", "-f", str(write_manifest(tmp_path, name)))[0] == 0
    theirs = f"theirs-{name}"
    core.create_namespace({"metadata": {"name": theirs}})
    copied = _owner_labels(kube, name) | {"bottle.role": "bundle"}
    core.create_namespaced_config_map(theirs, {"metadata": {"name": "team-config", "labels": copied}})
    # A Pod that cannot be deleted (a finalizer): `down` must not wait for it.
    core.create_namespaced_pod(theirs, {"metadata": {"name": "decoy", "labels": copied, "finalizers": ["example.com/hold"]},
                                        "spec": {"containers": [{"name": "c", "image": "x"}]}})  # fmt: skip
    try:
        code, out, err = run(capsys, "down", name)
        assert code == 0, err
        assert "team-config" not in out and "decoy" not in out
        code, out, err = run(capsys, "gc")
        assert code == 0 and "removed" not in out
        assert core.read_namespaced_config_map("team-config", theirs).metadata.deletion_timestamp is None
        assert core.read_namespaced_pod("decoy", theirs).metadata.deletion_timestamp is None
    finally:
        core.patch_namespaced_pod("decoy", theirs, {"metadata": {"finalizers": None}})
        core.delete_namespaced_pod("decoy", theirs, grace_period_seconds=0)
        core.delete_namespace(theirs)


def test_a_kubeconfig_that_is_not_yaml_is_one_sentence(capsys, name, tmp_path, monkeypatch):
    broken = tmp_path / "kubeconfig"
    broken.write_text("clusters: [unclosed\n  - {")
    monkeypatch.setenv("KUBECONFIG", str(broken))
    for command in (["up", "-d", "-f", str(write_manifest(tmp_path, name))], ["ls"]):
        code, _, err = run(capsys, *command)
        assert "internal error" not in err and "Traceback" not in err, (command, err)
        assert f"the kubeconfig {broken} cannot be used" in err, (command, err)
    code, out, err = run(capsys, "plan", "-f", str(tmp_path / f"{name}.toml"))  # rendered without a cluster
    assert code == 0 and "server         (no usable kubeconfig context)" in out and "`bottle doctor` says why" in err


def test_logs_and_attach_go_through_the_api_server(capsys, kube, kubelet, name, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    """No kubelet here: the API server has no log for a Pod on no node (it answers with an empty one), and
    cannot open its terminal, and says so."""
    monkeypatch.setenv("BOTTLE_K8S_TEST_KEY", SECRET)
    path = write_manifest(tmp_path, name)
    assert run(capsys, "up", "-d", "-f", str(path))[0] == 0
    assert run(capsys, "logs", name) == (0, "", "")
    code, _, err = run(capsys, "up", "-f", str(path))  # up, then attach
    assert code == 1 and f"bottle: cannot attach to Pod bottle-{name}-agent: " in err
    assert run(capsys, "down", name)[0] == 0
