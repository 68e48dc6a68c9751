"""`bottle up`, `down`, `ls` and `gc` against the real Docker Engine and the fake smolvm."""

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bottle.backend import LABEL_SLUG
from bottle.backends.smolmachines import SmolmachinesBackend
from bottle.manifest import load_manifest
from bottle.state import StateStore
from bottle.testing import fake_smolvm
from tests.integration.conftest import MUTE_IMAGE, READY_IMAGE, TEST_LABEL, bottle, leftovers


def http_status_line(ip: str, port: int) -> str:
    with socket.create_connection((ip, port), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return conn.recv(200).decode(errors="replace").splitlines()[0]


def test_up_detach_then_down_leaves_nothing(engine, slug, smolvm_state, home, write_manifest):
    manifest = write_manifest()
    result = bottle("up", "-f", str(manifest), "--detach")
    assert result.returncode == 0, result.stderr
    plan = json.loads((home / "bottles" / slug / "plan.json").read_text())

    network = engine.networks.get(plan["network_id"])
    assert network.attrs["IPAM"]["Config"] == [{"Subnet": plan["bundle_subnet"], "Gateway": plan["bundle_gateway"]}]
    container = engine.containers.get(plan["bundle_container_name"])
    assert container.status == "running"
    assert container.attrs["NetworkSettings"]["Networks"][plan["network_name"]]["IPAddress"] == plan["bundle_ip"]
    assert container.labels[LABEL_SLUG] == slug
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    assert mounts["/etc/bottle"]["RW"] is False
    assert http_status_line(plan["bundle_ip"], 8888).startswith("HTTP/1.")  # answers from the host

    machine = fake_smolvm.machines(smolvm_state)[f"bottle-{slug}"]
    assert machine["state"] == "running"
    assert machine["allowed_cidrs"] == [f"{plan['bundle_ip']}/32"]  # as the real smolvm recorded them
    assert machine["dns"] == plan["bundle_ip"]
    assert machine["labels"][LABEL_SLUG] == slug and machine["cmd"] == ["sleep", "2147483647"]

    result = bottle("down", slug)
    assert result.returncode == 0, result.stderr
    assert f"removed machine bottle-{slug}" in result.stdout
    assert f"removed network bottle-{slug}" in result.stdout
    assert leftovers(engine, slug, smolvm_state, home) == {}
    assert list((home / "cache" / "images").glob("*.tar"))  # the image cache outlives the bottle

    again = bottle("down", slug)
    assert again.returncode == 0 and f"bottle '{slug}': nothing to remove" in again.stdout


def creates(smolvm_state):
    return [c for c in fake_smolvm.calls(smolvm_state) if c[2:4] == ["machine", "create"]]


def test_the_machine_is_made_from_the_smolfile_and_a_saved_image(engine, slug, smolvm_state, home, write_manifest):
    assert bottle("up", "-f", str(write_manifest()), "--detach").returncode == 0
    bottle_dir = home / "bottles" / slug
    [create] = creates(smolvm_state)
    assert create[:2] == ["--error-format", "json"]
    assert create[create.index("--smolfile") + 1] == str(bottle_dir / "Smolfile") and "--from" not in create
    image_id = engine.images.get(READY_IMAGE).id.removeprefix("sha256:")
    assert create[create.index("--image") + 1] == str(home / "cache" / "images" / f"{image_id}.tar")
    archive = home / "cache" / "images" / f"{image_id}.tar"
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    machine = fake_smolvm.machines(smolvm_state)[f"bottle-{slug}"]
    assert machine["image"] == f"local:{hashlib.sha256(archive.read_bytes()).hexdigest()}"
    assert machine["mounts"] == 1  # the guest directory, read-only (the Smolfile's one volume)
    guest = bottle_dir / "guest"
    assert sorted(p.name for p in guest.iterdir()) == ["ca.pem"]  # the certificate, never the key
    assert "PRIVATE KEY" not in (guest / "ca.pem").read_text()
    bottle("down", slug)


def test_secrets_reach_the_bundle_and_nothing_else(engine, slug, smolvm_state, home, write_manifest, tmp_path):
    manifest = write_manifest()
    manifest.write_text(
        manifest.read_text().replace(
            "[bundle]",
            '[[egress.credentials]]\nhost = "api.anthropic.com"\nheader = "x-api-key"\nfrom_env = "IT_SECRET"\n[bundle]',
        )
    )
    secret = f"sk-ant-it-{uuid.uuid4().hex}"
    result = bottle("up", "-f", str(manifest), "--detach", env={"IT_SECRET": secret})
    assert result.returncode == 0, result.stderr
    bottle_dir = home / "bottles" / slug
    secrets_file = bottle_dir / "bundle" / "secrets.json"
    assert json.loads(secrets_file.read_text()) == {"credential-0": secret}
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    elsewhere = [bottle_dir / "plan.json", bottle_dir / "Smolfile", bottle_dir / "bundle" / "config.json",
                 smolvm_state / "calls.jsonl", smolvm_state / "env.json"]  # fmt: skip
    for path in elsewhere:
        assert secret not in path.read_text(), path
    container = engine.containers.get(f"bottle-{slug}-bundle")
    assert secret not in json.dumps(container.attrs)
    assert secret not in result.stdout + result.stderr
    bottle("down", slug)


def test_a_missing_secret_is_named_and_leaves_nothing(engine, slug, smolvm_state, home, write_manifest):
    manifest = write_manifest()
    manifest.write_text(
        manifest.read_text().replace(
            "[bundle]",
            '[[egress.credentials]]\nhost = "api.anthropic.com"\nheader = "x-api-key"\nfrom_env = "IT_UNSET"\n[bundle]',
        )
    )
    result = bottle("up", "-f", str(manifest), "--detach", env={"IT_UNSET": ""})
    assert result.returncode == 1
    assert "step 'secrets' failed: credential for api.anthropic.com: $IT_UNSET is not set or empty" in result.stderr
    assert leftovers(engine, slug, smolvm_state, home) == {}


def test_a_second_up_adopts_and_attaches(engine, slug, smolvm_state, home, write_manifest):
    manifest = write_manifest()
    assert bottle("up", "-f", str(manifest), "--detach").returncode == 0
    container_id = engine.containers.get(f"bottle-{slug}-bundle").id
    calls_before = len(fake_smolvm.calls(smolvm_state))

    result = bottle("up", "-f", str(manifest))
    assert result.returncode == 0, result.stderr
    new_calls = fake_smolvm.calls(smolvm_state)[calls_before:]
    assert not [c for c in new_calls if c[2:4] == ["machine", "create"]]
    assert new_calls[-1] == ["--error-format", "json", "machine", "exec", "--name", f"bottle-{slug}", "-i", "--", "sh"]
    assert engine.containers.get(f"bottle-{slug}-bundle").id == container_id
    assert "reusing" in result.stderr
    bottle("down", slug)


STEP_FAULTS = [
    ("bundle start", {}, "bottle-test-bundle:missing"),
    ("bundle ready", {"BOTTLE_READY_TIMEOUT": "2"}, MUTE_IMAGE),
    ("machine create", {"fail": "machine-create"}, READY_IMAGE),
    ("machine start", {"fail": "machine-start"}, READY_IMAGE),
    ("probe", {"fail": "machine-exec"}, READY_IMAGE),
    ("probe", {"net": "open"}, READY_IMAGE),  # a VM whose allowlist is not enforced
]


@pytest.mark.parametrize(("step", "env", "image"), STEP_FAULTS, ids=[f"{s}-{e}" for s, e, _ in STEP_FAULTS])
def test_a_failing_step_is_named_and_leaves_nothing(engine, slug, smolvm_state, home, write_manifest, step, env, image):
    fake_smolvm.control(smolvm_state, **{k: v for k, v in env.items() if k in ("fail", "net")})
    env = {k: v for k, v in env.items() if k not in ("fail", "net")}
    result = bottle("up", "-f", str(write_manifest(bundle_image=image)), "--detach", env=env)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"bottle: step '{step}' failed: ")
    assert message.endswith("what this run created was removed")
    assert "Traceback" not in result.stderr
    assert leftovers(engine, slug, smolvm_state, home) == {}


def test_a_failing_network_step_is_named_and_leaves_nothing(engine, slug, smolvm_state, home, write_manifest):
    engine.networks.create(f"bottle-{slug}", labels={TEST_LABEL: slug})  # someone else's network, our name
    result = bottle("up", "-f", str(write_manifest()), "--detach")
    assert result.returncode == 1
    assert "bottle: step 'network' failed: a docker network named" in result.stderr
    assert leftovers(engine, slug, smolvm_state, home) == {}


def test_bundle_never_ready_shows_its_last_log_lines(engine, slug, smolvm_state, home, write_manifest):
    result = bottle("up", "-f", str(write_manifest(bundle_image=MUTE_IMAGE)), "-d", env={"BOTTLE_READY_TIMEOUT": "1"})
    assert "did not accept connections on" in result.stderr and "its last log lines" in result.stderr


HANGING_STEPS = [("machine create", "machine-create"), ("machine start", "machine-start"), ("probe", "machine-exec")]


@pytest.mark.parametrize(("step", "fake_step"), HANGING_STEPS, ids=[s for s, _ in HANGING_STEPS])
def test_sigint_during_a_smolvm_step_leaves_nothing(engine, slug, smolvm_state, home, write_manifest, step, fake_step):
    fake_smolvm.control(smolvm_state, hang=fake_step)
    process = subprocess.Popen(
        [sys.executable, "-m", "bottle", "up", "-f", str(write_manifest()), "--detach"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    marker = smolvm_state / f"hanging-{fake_step}"
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "bottle: interrupted" in err and "Traceback" not in err
    assert leftovers(engine, slug, smolvm_state, home) == {}


def test_sigint_while_waiting_for_the_bundle_leaves_nothing(engine, slug, smolvm_state, home, write_manifest):
    process = subprocess.Popen(
        [sys.executable, "-m", "bottle", "up", "-f", str(write_manifest(bundle_image=MUTE_IMAGE)), "--detach"],
        env={**os.environ, "BOTTLE_READY_TIMEOUT": "60"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not engine.containers.list(filters={"label": f"{LABEL_SLUG}={slug}", "status": "running"}):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert leftovers(engine, slug, smolvm_state, home) == {}


@pytest.mark.parametrize("step", ["network", "bundle start", "bundle ready"])
def test_an_interrupt_right_after_each_docker_step_leaves_nothing(engine, slug, smolvm_state, home, write_manifest, step):
    # Docker steps finish too fast to signal reliably mid-way; Ctrl-C right after each one is the case
    # that matters, since that is when the step's resources exist and the next step has not started.
    def on_step(name: str, detail: str) -> None:
        if name == step:
            raise KeyboardInterrupt

    manifest = load_manifest(write_manifest())
    backend = SmolmachinesBackend()
    report = backend.preflight(docker=engine)
    with pytest.raises(KeyboardInterrupt):
        backend.up(manifest, docker=engine, state=StateStore(), preflight=report, on_step=on_step)
    assert leftovers(engine, slug, smolvm_state, home) == {}


def test_ten_bottles_at_once_get_ten_subnets(engine, slug, smolvm_state, home, write_manifest):
    names = [f"{slug}-{i}" for i in range(10)]
    manifests = [write_manifest(name=n) for n in names]
    try:
        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(lambda m: bottle("up", "-f", str(m), "--detach"), manifests))
        assert [r.returncode for r in results] == [0] * 10, [r.stderr for r in results if r.returncode]
        subnets = [json.loads((home / "bottles" / n / "plan.json").read_text())["bundle_subnet"] for n in names]
        assert len(set(subnets)) == 10
    finally:
        with ThreadPoolExecutor(10) as pool:
            list(pool.map(lambda n: bottle("down", n), names))
    for name in names:
        assert leftovers(engine, name, smolvm_state, home) == {}


def test_five_ups_of_one_bottle_at_once_leave_one_bottle(engine, slug, smolvm_state, home, write_manifest):
    manifest = write_manifest()
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda _: bottle("up", "-f", str(manifest), "--detach"), range(5)))
    assert [r.returncode for r in results] == [0] * 5, [r.stderr for r in results if r.returncode]
    label = {"label": f"{LABEL_SLUG}={slug}"}
    assert len(engine.networks.list(filters=label)) == 1
    assert len(engine.containers.list(all=True, filters=label)) == 1
    assert len(creates(smolvm_state)) == 1
    bottle("down", slug)


def test_ls_shows_state_and_flags_drift(engine, slug, smolvm_state, home, write_manifest):
    assert bottle("up", "-f", str(write_manifest()), "--detach").returncode == 0
    listed = {b["slug"]: b for b in json.loads(bottle("ls", "--json").stdout)}
    assert listed[slug]["state"] == "running"
    assert listed[slug]["parts"] == {"network": "present", "bundle": "running", "machine": "running"}

    subprocess.run([os.environ["BOTTLE_SMOLVM"], "machine", "delete", "--name", f"bottle-{slug}", "-f"], check=True,
                   capture_output=True)  # fmt: skip
    listed = {b["slug"]: b for b in json.loads(bottle("ls", "--json").stdout)}
    assert listed[slug]["state"] == "partial"
    assert listed[slug]["drift"] == ["machine not up while bundle, network is (`bottle up` repairs it)"]
    text = bottle("ls").stdout
    assert slug in text and "partial" in text and "! machine not up" in text
    bottle("down", slug)


def test_gc_removes_what_belongs_to_no_bottle(engine, slug, smolvm_state, home, write_manifest):
    assert bottle("up", "-f", str(write_manifest()), "--detach").returncode == 0
    StateStore(home).remove_bottle(slug)  # as if the state directory had been lost

    dry = bottle("gc", "--dry-run")
    assert f"would remove {slug} (smolmachines)" in dry.stdout
    assert engine.networks.list(filters={"label": f"{LABEL_SLUG}={slug}"})

    result = bottle("gc")
    assert result.returncode == 0, result.stderr
    assert f"removed machine bottle-{slug}" in result.stdout  # known as ours by its owner label
    assert leftovers(engine, slug, smolvm_state, home) == {}


def test_a_stopped_machine_is_made_anew_never_trusted(engine, slug, smolvm_state, home, write_manifest):
    # smolvm does not report every option a machine was made with, so a stopped one is not adopted.
    manifest = write_manifest()
    assert bottle("up", "-f", str(manifest), "--detach").returncode == 0
    subprocess.run([os.environ["BOTTLE_SMOLVM"], "machine", "stop", "--name", f"bottle-{slug}"], check=True,
                   capture_output=True)  # fmt: skip
    result = bottle("up", "-f", str(manifest), "--detach")
    assert result.returncode == 0, result.stderr
    assert "is not running or differs from the plan; making it anew" in result.stderr
    assert len(creates(smolvm_state)) == 2
    assert bottle("down", slug).returncode == 0


def test_the_probe_catches_a_vm_that_leaks_only_datagrams(engine, slug, home, write_manifest, real_smolvm, python_base,
                                                          tmp_path, monkeypatch):  # fmt: skip
    """A VM whose TCP is confined but whose UDP gets out: the probe's listener sees the datagram."""
    state = tmp_path / "smolvm-udp"
    monkeypatch.setenv("BOTTLE_SMOLVM", str(fake_smolvm.install(tmp_path / "bin-udp", state, real_smolvm, python_base)))
    fake_smolvm.control(state, net="udp")
    try:
        result = bottle("up", "-f", str(write_manifest()), "--detach")
        assert result.returncode == 1
        message = result.stderr.strip().splitlines()[-1]
        assert message.startswith("bottle: step 'probe' failed: the VM reached ") and "(UDP)" in message, message
        assert "(TCP)" not in message
        assert leftovers(engine, slug, state, home) == {}
    finally:
        fake_smolvm.cleanup(state)
