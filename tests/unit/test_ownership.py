"""What bottle considers its own: `ls`, `gc` and `down` against resources a hostile neighbour labelled."""

import json
import os
import tempfile
from pathlib import Path

import pytest
from docker.types import IPAMConfig, IPAMPool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bottle.backend import LABEL_BACKEND, LABEL_MANAGED, LABEL_OWNER, LABEL_SLUG
from bottle.backends.smolmachines.smolvm import Smolvm, smolvm_environment
from bottle.cli import main
from bottle.state import StateStore
from bottle.testing import FakeDocker

HOSTILE_SLUGS = ["../../canary", "..", "../canary", "/tmp", "a/../../canary", "", "UPPER", "x" * 41, "a\nb"]


@pytest.fixture
def fake(mocker):
    client = FakeDocker()
    client.engine.add_image("neighbour:1")
    mocker.patch("bottle.cli.docker_client", return_value=client)
    return client


@pytest.fixture
def smolvm_state(real_smolvm):
    """The real smolvm, on a state directory of this test's own."""
    return real_smolvm


@pytest.fixture
def home(tmp_path, monkeypatch):
    """BOTTLE_HOME with a bottle state root already in use, and a canary next to it that gc must never touch."""
    root = tmp_path / "nest" / "home"
    monkeypatch.setenv("BOTTLE_HOME", str(root))
    StateStore(root).owner(create=True)
    for canary in (tmp_path / "nest" / "canary", tmp_path / "canary"):
        canary.mkdir(parents=True, exist_ok=True)
        (canary / "precious").write_text("keep")
    return root


def cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def neighbour(client, name, resource_labels, *, network=False):
    if network:
        return client.networks.create(name, labels=resource_labels)
    return client.containers.create("neighbour:1", name=name, labels=resource_labels)


@pytest.mark.parametrize("slug", HOSTILE_SLUGS)
@pytest.mark.parametrize("network", [False, True])
def test_gc_never_turns_a_hostile_slug_label_into_a_path(capsys, fake, home, smolvm_state, tmp_path, slug, network):
    hostile = {LABEL_MANAGED: "true", LABEL_SLUG: slug, LABEL_BACKEND: "smolmachines"}
    neighbour(fake, "from-an-image", hostile, network=network)
    code, out, err = cli(capsys, "gc")
    assert code == 0, err
    assert (tmp_path / "nest" / "canary" / "precious").read_text() == "keep"
    assert (tmp_path / "canary" / "precious").read_text() == "keep"
    assert "left alone:" in err and "is not a bottle slug" in err
    assert "removed" not in out
    assert any(n.name == "from-an-image" for n in fake.networks.list()) or any(
        c.name == "from-an-image" for c in fake.containers.list(all=True)
    )


def test_copied_labels_even_with_a_valid_slug_are_not_ownership(capsys, fake, home, smolvm_state):
    copied = {LABEL_MANAGED: "true", LABEL_SLUG: "victim", LABEL_BACKEND: "smolmachines"}
    neighbour(fake, "bottle-victim", copied, network=True)
    neighbour(fake, "bottle-victim-bundle", copied | {LABEL_OWNER: "f" * 32})
    for args in (["gc"], ["down", "victim"]):
        code, out, err = cli(capsys, *args)
        assert code == 0 and "removed" not in out, (args, out, err)
    assert [n.name for n in fake.networks.list(filters={"label": LABEL_SLUG})] == ["bottle-victim"]
    assert [c.name for c in fake.containers.list(all=True)] == ["bottle-victim-bundle"]


@pytest.mark.parametrize("managed", ["false", "", "TRUE"])
def test_down_leaves_resources_that_are_not_marked_managed(capsys, fake, home, smolvm_state, managed):
    owner = StateStore(home).owner()
    neighbour(fake, "bottle-b", {LABEL_MANAGED: managed, LABEL_SLUG: "b", LABEL_BACKEND: "smolmachines",
                                 LABEL_OWNER: owner}, network=True)  # fmt: skip
    assert cli(capsys, "down", "b")[:2] == (0, "bottle 'b': nothing to remove\n")
    assert len(fake.networks.list(filters={"label": LABEL_SLUG})) == 1


def test_a_resource_without_a_slug_label_is_drift_not_a_crash(capsys, fake, home, smolvm_state):
    neighbour(fake, "half-labelled", {LABEL_MANAGED: "true", LABEL_BACKEND: "smolmachines"}, network=True)
    code, out, err = cli(capsys, "ls")
    assert code == 0, err
    assert "foreign" in out and "network half-labelled carries bottle's labels but its bottle.slug label" in out
    code, out, _ = cli(capsys, "ls", "--json")
    assert code == 0 and json.loads(out)[0]["state"] == "foreign"
    assert cli(capsys, "gc", "--dry-run")[:2] == (0, "nothing to collect\n")


@pytest.mark.parametrize("made_labels", [{}, {LABEL_MANAGED: "true", LABEL_BACKEND: "smolmachines", LABEL_SLUG: "someone",
                                             LABEL_OWNER: "0" * 32}])  # fmt: skip
def test_gc_leaves_a_smolvm_machine_it_did_not_label_as_its_own(capsys, fake, home, smolvm_state, tmp_path, made_labels):
    smolfile = tmp_path / "Smolfile"
    smolfile.write_text("")
    smolvm_state.create("bottle-someone", "debian:bookworm", smolfile, labels=made_labels, flags=[], command=["true"])
    code, out, err = cli(capsys, "gc")
    assert code == 0 and "removed" not in out
    assert "smolvm machine bottle-someone carries bottle's name or labels but" in err
    assert "bottle-someone" in smolvm_state.machines()


label_keys = st.sampled_from([LABEL_MANAGED, LABEL_SLUG, LABEL_BACKEND, LABEL_OWNER, "bottle.role", "other"])
label_values = st.one_of(st.sampled_from(["true", "smolmachines", "OWNER", "b", *HOSTILE_SLUGS]), st.text(max_size=50))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(resources=st.lists(st.tuples(st.booleans(), st.dictionaries(label_keys, label_values)), max_size=6))
def test_any_labels_on_any_resource_never_crash_ls_or_gc_nor_name_a_path(capsys, mocker, monkeypatch, resources):
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "home"
        monkeypatch.setenv("BOTTLE_HOME", str(root))
        monkeypatch.setenv("BOTTLE_SMOLVM", str(Path(scratch) / "none"))  # no smolvm
        owner = StateStore(root).owner(create=True)
        client = FakeDocker()
        client.engine.add_image("neighbour:1")
        mocker.patch("bottle.cli.docker_client", return_value=client)
        for index, (network, found) in enumerate(resources):
            found = {k: owner if v == "OWNER" else v for k, v in found.items() if k}
            if network:
                ipam = IPAMConfig(pool_configs=[IPAMPool(subnet=f"10.99.{index}.0/24")])
                client.networks.create(f"n{index}", labels=found, ipam=ipam)
            else:
                client.containers.create("neighbour:1", name=f"c{index}", labels=found)
        before = sorted(Path(scratch).rglob("*"))
        for args in (["ls"], ["ls", "--json"], ["gc", "--dry-run"]):
            code, out, err = cli(capsys, *args)
            assert code == 0, (args, err)
            assert "internal error" not in err
            for line in out.splitlines():
                if line.startswith("would remove"):  # only slugs, which are never paths
                    assert "/" not in line.split(" ")[2] and ".." not in line
        assert sorted(Path(scratch).rglob("*")) == before


def test_smolvm_gets_no_secret_from_the_host_environment(tmp_path, monkeypatch):
    dump = tmp_path / "env.json"
    script = tmp_path / "smolvm"
    script.write_text(f"#!/bin/sh\n'{os.sys.executable}' -c 'import json,os; print(json.dumps(dict(os.environ)))' "
                      f"> '{dump}'\necho '[]'\n")  # fmt: skip
    script.chmod(0o755)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-canary")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary")
    monkeypatch.setenv("SMOLVM_LIB_DIR", "/opt/smol")
    monkeypatch.setenv("SMOLVM_ALLOW_HOST_LOOPBACK", "1")  # would open the host's loopback to the VM
    monkeypatch.setenv("SMOLVM_PUBLISH_ADDR", "0.0.0.0")  # switches on a floor that cuts off the bundle
    monkeypatch.setenv("SMOLVM_SECCOMP", "off")
    Smolvm(str(script)).machines()
    seen = json.loads(dump.read_text())
    assert "canary" not in json.dumps(seen)
    assert seen["SMOLVM_LIB_DIR"] == "/opt/smol" and seen["PATH"] == os.environ["PATH"]
    assert "SMOLVM_ALLOW_HOST_LOOPBACK" not in seen and "SMOLVM_PUBLISH_ADDR" not in seen
    assert (seen["SMOLVM_SECCOMP"], seen["SMOLVM_LANDLOCK"]) == ("enforce", "enforce")
    assert set(smolvm_environment({"GITHUB_TOKEN": "x", "HOME": "/h"})) == {"HOME", "SMOLVM_SECCOMP", "SMOLVM_LANDLOCK"}


def test_preflight_runs_smolvm_without_the_hosts_secrets(tmp_path, monkeypatch):
    from bottle.backends.smolmachines.preflight import check_smolvm

    dump = tmp_path / "env"
    script = tmp_path / "smolvm"
    script.write_text(f"#!/bin/sh\nenv > '{dump}'\necho 'smolvm 1.32.2'\n")
    script.chmod(0o755)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-canary")
    check, version = check_smolvm(Smolvm(str(script)))
    assert check.ok and version == "1.32.2"
    assert "sk-ant-canary" not in dump.read_text()


@pytest.mark.parametrize("plan", ["[1]", '{"backend": "smolmachines"}', '{"backend": "smolm', '"text"'])
def test_a_damaged_plan_is_drift_and_down_still_removes_the_bottle(capsys, fake, home, smolvm_state, plan):
    store = StateStore(home)
    store.write_private(store.bottle_dir("b") / "plan.json", plan.encode())
    neighbour(fake, "bottle-b", {LABEL_MANAGED: "true", LABEL_SLUG: "b", LABEL_BACKEND: "smolmachines",
                                 LABEL_OWNER: store.owner()}, network=True)  # fmt: skip
    code, out, err = cli(capsys, "ls")
    assert code == 0 and "its plan cannot be read (`bottle down b` removes the bottle)" in out, err
    assert cli(capsys, "gc", "--dry-run")[:2] == (0, "nothing to collect\n")  # not an orphan: it has a directory
    code, out, err = cli(capsys, "down", "b")
    assert code == 0 and "removed network bottle-b" in out and not store.bottle_dir("b").exists(), err


def test_gc_exits_1_when_an_orphan_cannot_be_removed(capsys, fake, home, smolvm_state):
    owner = StateStore(home).owner()
    neighbour(fake, "bottle-b", {LABEL_MANAGED: "true", LABEL_SLUG: "b", LABEL_BACKEND: "smolmachines",
                                 LABEL_OWNER: owner}, network=True)  # fmt: skip
    fake.engine.fail_next("DELETE", "/networks/.+", 500, "engine on fire")
    code, out, err = cli(capsys, "gc")
    assert code == 1 and "skipped b: could not remove all of bottle 'b': network: " in err
    assert err.strip().splitlines()[-1] == "bottle: could not collect b; the lines above say why"


def test_logs_read_only_this_state_directorys_bundle(capsys, fake, home, smolvm_state):
    spoof = {LABEL_MANAGED: "true", LABEL_SLUG: "b", LABEL_BACKEND: "smolmachines", "bottle.role": "bundle"}
    neighbour(fake, "from-an-image", spoof)
    neighbour(fake, "another-home", spoof | {LABEL_OWNER: "a" * 32})
    code, out, err = cli(capsys, "logs", "b")
    assert (code, out) == (2, "") and "has no bundle made from this state directory" in err
