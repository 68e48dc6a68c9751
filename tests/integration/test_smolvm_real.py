"""The launcher against the real smolvm (the smolmachines wheel), and the fake checked against it.

Everything here but the last test runs on any Linux machine: the real binary answers every call that
does not boot a VM. Each test gives smolvm a state directory of its own.
"""

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from bottle.backends.smolmachines import smolfile
from bottle.backends.smolmachines.launch import WORKLOAD, check_recorded
from bottle.backends.smolmachines.plan import SmolmachinesBottlePlan
from bottle.backends.smolmachines.smolvm import Smolvm, SmolvmFailed
from bottle.errors import StepFailed
from bottle.testing import fake_smolvm
from bottle.testing.images import READY_IMAGE

from .conftest import bottle

BUNDLE, GATEWAY = IPv4Address("192.168.201.2"), IPv4Address("192.168.201.1")


@pytest.fixture
def real(real_smolvm) -> Iterator[Smolvm]:
    """The real smolvm on a state directory of its own, with a short path: a booting machine's sockets
    live there, and a Unix socket path may hold at most 107 bytes."""
    state = tempfile.mkdtemp(prefix="bsv-")
    yield Smolvm(real_smolvm.executable, env=real_smolvm.env, state_dir=Path(state))
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def bottles_smolfile(tmp_path) -> Path:
    guest = tmp_path / "guest"
    guest.mkdir()
    path = tmp_path / "Smolfile"
    env = {"HTTPS_PROXY": f"http://{BUNDLE}:8888", "TERM": "xterm"}
    path.write_text(smolfile.render(smolfile.build(env, BUNDLE, GATEWAY, guest)))
    return path


@pytest.fixture
def archive(engine, bundle_images, tmp_path) -> str:
    path = tmp_path / "image.tar"
    with open(path, "wb") as out:
        for chunk in engine.images.get(READY_IMAGE).save(named=True):
            out.write(chunk)
    return str(path)


def create(smolvm: Smolvm, name: str, image: str, smolfile_path: Path) -> None:
    smolvm.create(name, image, smolfile_path, labels={"bottle.slug": "x", "bottle.config": "abc"},
                  flags=["--dns", str(BUNDLE)], command=WORKLOAD)  # fmt: skip


def plan_for(tmp_path: Path) -> SmolmachinesBottlePlan:
    return SmolmachinesBottlePlan(
        name="x", slug="x", network_name="bottle-x", network_id=None, bundle_subnet="192.168.201.0/24",
        bundle_gateway=GATEWAY, bundle_ip=BUNDLE, bundle_container_name="bottle-x-bundle", bundle_image="b",
        smolfile_path=tmp_path / "Smolfile", bundle_dir=tmp_path, guest_dir=tmp_path, machine_name="bottle-x",
        agent_image="a", agent_command=["sh"], agent_env={}, smolvm_version=None,
    )  # fmt: skip


def test_the_real_smolvm_takes_bottles_machine_as_it_is_made(real, bottles_smolfile, archive, tmp_path):
    create(real, "bottle-x", archive, bottles_smolfile)
    machine = real.machines()["bottle-x"]
    assert machine["labels"] == {"bottle.slug": "x", "bottle.config": "abc"}
    assert (machine["allowed_cidrs"], machine["dns"], machine["cmd"]) == ([f"{BUNDLE}/32"], str(BUNDLE), WORKLOAD)
    assert machine["network"] is True and machine["state"] == "created" and machine["image"].startswith("local:")
    check_recorded(machine, plan_for(tmp_path))  # what `up` checks after every create


def test_the_real_smolvms_errors_come_as_codes(real, bottles_smolfile, archive, tmp_path):
    create(real, "m", archive, bottles_smolfile)
    with pytest.raises(SmolvmFailed) as exists:
        create(real, "m", archive, bottles_smolfile)
    assert exists.value.code == "CONFIG_ERROR"
    bad = tmp_path / "Bad"
    bad.write_text('[network]\nallow_cidrs = ["192.168.201.2/32"]\ndns = "1.1.1.1"\n')
    with pytest.raises(SmolvmFailed) as unknown_key:
        create(real, "n", archive, bad)
    assert unknown_key.value.code == "CONFIG_ERROR" and "unknown field `dns`" in unknown_key.value.reason
    with pytest.raises(SmolvmFailed) as usage:
        real._run("machine start", ["machine", "start", "m"])  # a bare name, as bottle once sent it
    assert usage.value.code == "USAGE"
    assert real.delete("m") is True and real.delete("m") is False  # NOT_FOUND is "already gone"
    assert real.machines() == {}


def test_a_machine_the_real_smolvm_records_without_the_allowlist_is_refused(real, archive, tmp_path):
    unconfined = tmp_path / "Open"
    unconfined.write_text("net = true\n")
    create(real, "open", archive, unconfined)
    with pytest.raises(StepFailed, match="allowed_cidrs=None, mounts=0, not as bottle made it"):
        check_recorded(real.machines()["open"], plan_for(tmp_path))


def test_a_machine_with_bottles_labels_and_more_than_bottle_gives_is_refused(real, bottles_smolfile, archive, tmp_path):
    # What someone who can write this smolvm state could plant under a bottle's name and labels.
    real.create("wider", archive, bottles_smolfile, labels={}, command=WORKLOAD,
                flags=["--dns", str(BUNDLE), "-p", "2222:22", "--allow-udp", "0.0.0.0/0"])  # fmt: skip
    with pytest.raises(StepFailed, match="ports=1, not as bottle made it"):
        check_recorded(real.machines()["wider"], plan_for(tmp_path))


# The calls bottle makes, and their failure forms, compared between the real smolvm and the fake.
PARITY_CALLS = [
    ["--version"],
    ["machine", "create", "--name", "p", "--image", "{archive}", "--smolfile", "{smolfile}", "--label", "a=b",
     "--dns", str(BUNDLE), "--", *WORKLOAD],
    ["machine", "create", "--name", "p", "--image", "{archive}", "--smolfile", "{smolfile}"],  # exists
    ["machine", "create", "p2", "--image", "{archive}"],  # a bare name: usage error
    ["machine", "ls", "--json"],
    ["machine", "status", "--name", "p", "--json"],
    ["machine", "exec", "--name", "p", "--", "true"],  # created, not started
    ["machine", "exec", "-n", "p", "--", "true"],  # exec takes only --name
    ["machine", "exec", "--name", "nope", "--", "true"],
    ["machine", "start", "--name", "nope"],
    ["machine", "stop", "--name", "p"],
    ["machine", "delete", "--name", "nope", "-f"],
    ["machine", "delete", "--name", "p", "-f"],
    ["machine", "ls", "--json"],
]


def outcome(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    result = subprocess.run(argv, capture_output=True, text=True, env=os.environ | env, check=False)
    out = result.stdout
    try:
        listed = json.loads(out)
        for machine in listed if isinstance(listed, list) else [listed]:
            machine.pop("created_at", None)
        out = json.dumps(listed, sort_keys=True)
    except ValueError:
        pass
    code = json.loads(result.stderr.strip().splitlines()[-1])["error"]["code"] if result.returncode == 1 else ""
    return result.returncode, out, code


def test_the_fake_answers_as_the_real_smolvm_wherever_the_real_one_can(real, bottles_smolfile, archive, tmp_path,
                                                                          engine):  # fmt: skip
    state = tmp_path / "fake-state"
    fake = fake_smolvm.install(tmp_path / "bin", state, real, READY_IMAGE)
    for call in PARITY_CALLS:
        args = [a.format(archive=archive, smolfile=bottles_smolfile) for a in call]
        real_answer = outcome(real.argv(*args), real.env)
        fake_answer = outcome([str(fake), "--error-format", "json", *args], {})
        assert fake_answer == real_answer, args
    fake_smolvm.cleanup(state)


def test_up_against_the_real_smolvm_gets_as_far_as_the_boot(engine, slug, home, write_manifest, real, monkeypatch):
    """Every argument, label and Smolfile is accepted; here the boot itself fails (no hardware KVM)."""
    monkeypatch.delenv("BOTTLE_SMOLVM")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("BOTTLE_SMOLVM_STATE_DIR", str(real.state_dir))
    result = bottle("up", "-f", str(write_manifest()), "--detach", env={"SMOLVM_VM_UID_DROP": "off"}, timeout=300)
    if os.environ.get("BOTTLE_TEST_KVM") == "1":
        assert result.returncode == 0, result.stderr
        assert "probe" in result.stderr and "reaches its bundle and nothing else" in result.stderr
        assert bottle("down", slug).returncode == 0
    else:
        assert result.returncode == 1
        assert "machine create" in result.stderr and "machine start" in result.stderr
        assert "step 'machine start' failed: smolvm:" in result.stderr and "(SMOLVM_ERROR)" in result.stderr, result.stderr
    assert real.machines() == {}  # the failed up removed the machine it made
    label = {"label": f"bottle.slug={slug}"}
    assert engine.networks.list(filters=label) == engine.containers.list(all=True, filters=label) == []
    assert not (home / "bottles" / slug).exists()
