import json
import stat
import tomllib
from ipaddress import IPv4Network

import docker
import pytest
from docker.types import IPAMConfig, IPAMPool

from bottle.backend import PreflightReport
from bottle.backends.smolmachines import SmolmachinesBackend, SmolmachinesBottlePlan
from bottle.errors import BottleError, DockerProblem, StateError, UsageError
from bottle.manifest import parse_manifest
from bottle.state import StateStore
from bottle.testing import FakeDocker

REPORT = PreflightReport(backend="smolmachines", checks=[], facts={"smolvm_version": "0.8.0"})
LABELS = {"bottle.managed": "true", "bottle.slug": "claude-code", "bottle.backend": "smolmachines"}


@pytest.fixture
def manifest():
    return parse_manifest({"name": "claude-code", "agent": {"image": "node:22", "env": {"TERM": "xterm"}}})


@pytest.fixture
def fake():
    return FakeDocker()


@pytest.fixture
def state(tmp_path):
    return StateStore(tmp_path / "state")


@pytest.fixture
def backend():
    return SmolmachinesBackend(routes=[])


def prepare(backend, manifest, fake, state):
    return backend.prepare(manifest, docker=fake, state=state, preflight=REPORT)


def foreign_network(client, name, subnet):
    ipam = IPAMConfig(pool_configs=[IPAMPool(subnet=subnet)])
    return client.networks.create(name, driver="bridge", ipam=ipam, labels={"test": "foreign"})


def test_prepare_creates_the_network_with_exact_subnet_gateway_and_labels(backend, manifest, fake, state):
    plan = prepare(backend, manifest, fake, state)
    creates = [c for c in fake.engine.calls if c.method == "POST"]
    assert len(creates) == 1
    assert creates[0].path == "/networks/create"
    body = creates[0].body
    assert body["Name"] == "bottle-claude-code"
    assert body["Driver"] == "bridge"
    assert body["CheckDuplicate"] is True
    assert body["Labels"] == LABELS | {"bottle.owner": state.owner()}
    assert body["IPAM"]["Config"] == [
        {"Subnet": "192.168.38.0/24", "Gateway": "192.168.38.1", "IPRange": None, "AuxiliaryAddresses": None}
    ]
    network = fake.networks.get(plan.network_id)
    assert network.name == plan.network_name == "bottle-claude-code"


def test_plan_fields(backend, manifest, fake, state):
    plan = prepare(backend, manifest, fake, state)
    assert (str(plan.bundle_subnet), str(plan.bundle_gateway), str(plan.bundle_ip)) == (
        "192.168.38.0/24",
        "192.168.38.1",
        "192.168.38.2",
    )
    assert plan.allow_cidr == "192.168.38.2/32"
    assert plan.machine_name == "bottle-claude-code"
    assert plan.bundle_container_name == "bottle-claude-code-bundle"
    assert plan.bundle_image == "bottle-bundle:latest"
    assert plan.smolfile_path == state.bottle_dir("claude-code") / "Smolfile"
    assert plan.smolvm_version == "0.8.0"


def test_agent_env_points_every_proxy_variable_at_the_bundle_by_ip(backend, manifest, fake, state):
    env = prepare(backend, manifest, fake, state).agent_env
    for key in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"]:
        assert env[key] == "http://192.168.38.2:8888"
    # Only the VM's own loopback bypasses the proxy; no wildcard, domain or network does.
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1,::1"
    assert env["NODE_EXTRA_CA_CERTS"] == "/etc/bottle/ca.pem"
    assert env["TERM"] == "xterm"
    assert list(env) == sorted(env)


def test_smolfile_holds_the_plan_env_and_only_the_bundle_cidr(backend, manifest, fake, state):
    plan = prepare(backend, manifest, fake, state)
    data = tomllib.loads(plan.smolfile_path.read_text())
    assert data == {
        "env": [f"{k}={v}" for k, v in plan.agent_env.items()],
        "volumes": [f"{plan.guest_dir}:/etc/bottle:ro"],
        "net_backend": "virtio-net",
        "network": {
            "allow_cidrs": ["192.168.38.2/32"],
            "deny_cidrs": ["127.0.0.0/8", "169.254.0.0/16", "192.168.38.1/32", "::/0"],
        },
    }
    assert stat.S_IMODE(plan.smolfile_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(plan.smolfile_path.parent.stat().st_mode) == 0o700


def test_prepare_twice_adopts_the_network_and_returns_an_equal_plan(backend, manifest, fake, state):
    first = prepare(backend, manifest, fake, state)
    calls = len(fake.engine.calls)
    second = prepare(backend, manifest, fake, state)
    assert second == first
    assert {c.method for c in fake.engine.calls[calls:]} == {"GET"}  # looks, creates nothing
    assert len(fake.networks.list(filters={"label": "bottle.slug=claude-code"})) == 1


def test_adoption_is_by_label_even_after_the_pool_changes(manifest, fake, state):
    first = prepare(SmolmachinesBackend(routes=[]), manifest, fake, state)
    second = prepare(SmolmachinesBackend(pool=IPv4Network("10.0.0.0/8"), routes=[]), manifest, fake, state)
    assert second.bundle_subnet == first.bundle_subnet


def test_a_foreign_network_on_the_derived_subnet_is_probed_past(backend, manifest, fake, state):
    foreign_network(fake, "someone-else", "192.168.38.0/24")
    plan = prepare(backend, manifest, fake, state)
    assert str(plan.bundle_subnet) == "192.168.39.0/24"


def test_other_bottles_and_host_routes_are_probed_past(manifest, fake, state):
    other = parse_manifest({"name": "other", "agent": {"image": "x"}})
    taken = prepare(SmolmachinesBackend(routes=[]), other, fake, state).bundle_subnet
    backend = SmolmachinesBackend(routes=[IPv4Network("192.168.38.0/23")])
    plan = prepare(backend, manifest, fake, state)
    assert not plan.bundle_subnet.overlaps(IPv4Network("192.168.38.0/23"))
    assert plan.bundle_subnet != taken


def test_plan_creates_nothing_and_matches_what_prepare_then_does(backend, manifest, fake, state):
    planned = backend.plan(manifest, docker=fake, state=state, preflight=REPORT)
    assert planned.network_id is None
    assert [c.method for c in fake.engine.calls] == ["GET"]
    assert not state.root.exists()
    prepared = prepare(backend, manifest, fake, state)
    assert prepared == planned.model_copy(update={"network_id": prepared.network_id})


def test_a_foreign_network_with_our_name_is_an_error_not_adopted(backend, manifest, fake, state):
    foreign_network(fake, "bottle-claude-code", "10.9.0.0/24")
    with pytest.raises(UsageError, match="exists but this bottle state directory did not create it"):
        prepare(backend, manifest, fake, state)
    assert not (state.root / "bottles").exists()


def test_another_state_directorys_bottle_is_never_adopted(backend, manifest, fake, tmp_path):
    theirs = prepare(backend, manifest, fake, StateStore(tmp_path / "theirs"))
    with pytest.raises(UsageError, match="did not create it"):
        prepare(backend, manifest, fake, StateStore(tmp_path / "mine"))
    assert fake.networks.get(theirs.network_id).name == "bottle-claude-code"


def test_copied_labels_without_the_owner_id_are_not_adoption(backend, manifest, fake, state):
    state.owner(create=True)
    ipam = IPAMConfig(pool_configs=[IPAMPool(subnet="192.168.38.0/24")])
    fake.networks.create("lookalike", ipam=ipam, labels=LABELS | {"bottle.owner": "0" * 32})
    plan = prepare(backend, manifest, fake, state)
    assert plan.network_name == "bottle-claude-code" and str(plan.bundle_subnet) == "192.168.39.0/24"


def test_a_network_with_someone_elses_container_on_it_is_not_adopted(backend, manifest, fake, state):
    plan = prepare(backend, manifest, fake, state)
    fake.engine.add_image("intruder:1")
    fake.containers.create("intruder:1", name="intruder", network=plan.network_name).start()
    with pytest.raises(BottleError, match="has container 'intruder' attached, which is not this bottle's own"):
        prepare(backend, manifest, fake, state)


def test_losing_a_race_for_the_subnet_retries_on_the_next_free_one(backend, manifest, fake, state):
    fake.engine.fail_next("POST", "/networks/create", 403, "Pool overlaps with other one on this address space")
    plan = prepare(backend, manifest, fake, state)
    assert len([c for c in fake.engine.calls if c.method == "POST"]) == 2
    assert plan.network_id in fake.engine.networks


def test_losing_a_race_to_the_same_bottle_adopts_the_winner(backend, manifest, fake, state, mocker):
    winner = {}
    real_create = fake.networks.create

    def create_twice(*args, **kwargs):
        winner["network"] = real_create(*args, **kwargs)  # another `bottle prepare` got there first
        return real_create(*args, **kwargs)

    mocker.patch.object(type(fake.networks), "create", side_effect=create_twice)
    plan = prepare(backend, manifest, fake, state)
    assert plan.network_id == winner["network"].id


def test_an_engine_error_is_one_sentence_and_leaves_nothing(backend, manifest, fake, state):
    before = set(fake.engine.networks)
    fake.engine.fail_next("POST", "/networks/create", 500, "failed to set up bridge: operation not permitted")
    with pytest.raises(DockerProblem, match="docker refused to create network bottle-claude-code: failed to set"):
        prepare(backend, manifest, fake, state)
    assert set(fake.engine.networks) == before


def test_a_failure_after_creating_the_network_removes_it(backend, manifest, fake, state, mocker):
    before = set(fake.engine.networks)
    mocker.patch("bottle.state.os.replace", side_effect=OSError(28, "No space left on device"))
    with pytest.raises(StateError, match="cannot write .*: No space left on device"):
        prepare(backend, manifest, fake, state)
    assert set(fake.engine.networks) == before
    assert not state.bottle_dir(manifest.slug).exists()


def test_a_network_left_by_a_failed_undo_is_named_with_the_command_that_removes_it(
    backend, manifest, fake, state, mocker
):
    state.owner(create=True)
    mocker.patch("bottle.state.os.replace", side_effect=OSError(28, "No space left on device"))
    fake.engine.fail_next("DELETE", "/networks/.+", 500, "engine on fire")
    with pytest.raises(BottleError, match="could not remove: network bottle-claude-code .*`bottle down claude-code`"):
        prepare(backend, manifest, fake, state)


def test_a_failure_after_adopting_keeps_the_network(backend, manifest, fake, state, mocker):
    plan = prepare(backend, manifest, fake, state)
    mocker.patch("bottle.state.os.replace", side_effect=OSError(28, "No space left on device"))
    with pytest.raises(StateError):
        prepare(backend, manifest, fake, state)
    assert plan.network_id in fake.engine.networks


def test_a_network_with_our_labels_but_no_single_24_is_refused(backend, manifest, fake, state):
    ipam = IPAMConfig(pool_configs=[IPAMPool(subnet="10.9.0.0/16")])
    fake.networks.create("bottle-claude-code", ipam=ipam, labels=LABELS | {"bottle.owner": state.owner(create=True)})
    with pytest.raises(DockerProblem, match="has no single IPv4 /24"):
        prepare(backend, manifest, fake, state)


def test_plan_round_trips_through_json_exactly(backend, manifest, fake, state):
    plan = prepare(backend, manifest, fake, state)
    text = plan.model_dump_json()
    assert SmolmachinesBottlePlan.model_validate_json(text) == plan
    assert SmolmachinesBottlePlan.model_validate_json(text).model_dump_json() == text
    assert json.loads(text)["bundle_ip"] == "192.168.38.2"


def test_plans_are_frozen_and_reject_unknown_fields(backend, manifest, fake, state):
    plan = prepare(backend, manifest, fake, state)
    with pytest.raises(Exception, match="frozen"):
        plan.bundle_ip = "1.2.3.4"
    data = json.loads(plan.model_dump_json()) | {"surprise": 1}
    with pytest.raises(Exception, match="surprise"):
        SmolmachinesBottlePlan.model_validate(data)


def test_docker_errors_other_than_api_errors_propagate_as_docker_exceptions(backend, manifest, state, mocker):
    client = FakeDocker()
    mocker.patch.object(type(client.networks), "list", side_effect=docker.errors.DockerException("socket gone"))
    with pytest.raises(docker.errors.DockerException):
        prepare(backend, manifest, client, state)


def test_a_subnet_lost_to_a_racing_process_is_never_tried_again(backend, manifest, fake, state):
    for _ in range(3):  # the winner's network is not visible yet when we look again
        fake.engine.fail_next("POST", "/networks/create", 403, "Pool overlaps with other one on this address space")
    prepare(backend, manifest, fake, state)
    tried = [c.body["IPAM"]["Config"][0]["Subnet"] for c in fake.engine.calls if c.method == "POST"]
    assert tried == ["192.168.38.0/24", "192.168.39.0/24", "192.168.40.0/24", "192.168.41.0/24"]


def test_a_credential_can_ask_for_a_placeholder_in_the_vm_never_the_secret(backend, fake, state, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-real")
    manifest = parse_manifest({
        "name": "claude-code", "agent": {"image": "node:22"},
        "egress": {"allow": ["api.anthropic.com"], "credentials": [{
            "host": "api.anthropic.com", "header": "x-api-key", "from_env": "ANTHROPIC_API_KEY",
            "agent_placeholder": "ANTHROPIC_API_KEY"}]},
    })  # fmt: skip
    plan = prepare(backend, manifest, fake, state)
    assert plan.agent_env["ANTHROPIC_API_KEY"] == "bottle-placeholder-the-bundle-adds-the-real-key"
    assert "sk-ant-real" not in plan.model_dump_json() + plan.smolfile_path.read_text()


def test_a_crash_between_the_ca_and_the_guest_certificate_is_repaired(backend, manifest, fake, state):
    plan = prepare(backend, manifest, fake, state)
    ca = (plan.bundle_dir / "ca" / "mitmproxy-ca.pem").read_bytes()
    (plan.guest_dir / "ca.pem").unlink()
    prepare(backend, manifest, fake, state)
    assert (plan.guest_dir / "ca.pem").read_bytes() in ca  # the certificate of the CA the bundle has


def test_a_damaged_ca_is_made_anew_with_a_matching_guest_certificate(backend, manifest, fake, state):
    plan = prepare(backend, manifest, fake, state)
    (plan.bundle_dir / "ca" / "mitmproxy-ca.pem").write_bytes(b"-----BEGIN half a key")
    prepare(backend, manifest, fake, state)
    ca = (plan.bundle_dir / "ca" / "mitmproxy-ca.pem").read_bytes()
    assert b"PRIVATE KEY" in ca and (plan.guest_dir / "ca.pem").read_bytes() in ca
