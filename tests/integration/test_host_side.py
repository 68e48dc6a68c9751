"""The host side as a hostile neighbour and a bad day treat it, against the real Docker Engine.

Every case aims only at resources and paths the test made: images and containers labelled with the
test's slug, state directories and canaries under tmp_path, tmpfs mounts inside a private mount
namespace (`unshare`), and a unix-socket proxy of the test's own in front of the Engine.
"""

import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bottle.backend import LABEL_SLUG
from bottle.testing import fake_smolvm
from tests.integration.conftest import MUTE_IMAGE, TEST_LABEL, bottle, leftovers

HOSTILE_IMAGE = "bottle-test-hostile:labels"


@pytest.fixture(scope="session")
def hostile_image(engine, bundle_images) -> str:
    """An image whose labels claim its containers are a bottle's, slug `../../canary`: any container inherits them."""
    dockerfile = f"FROM {MUTE_IMAGE}\n".encode()
    hostile = {"bottle.managed": "true", "bottle.slug": "../../canary", "bottle.backend": "smolmachines"}
    engine.images.build(
        fileobj=io.BytesIO(dockerfile), tag=HOSTILE_IMAGE, labels=hostile | {TEST_LABEL: "image"}, rm=True, forcerm=True
    )
    return HOSTILE_IMAGE


def in_private_mounts(script: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a shell script as root of a new user and mount namespace, so it can mount what it likes privately."""
    if shutil.which("unshare") is None:
        pytest.fail("these tests need unshare (util-linux) to mount a tmpfs without touching the host's mounts")
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-euc", script],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        env={**os.environ, "PY": sys.executable, **env},
    )  # fmt: skip


def test_gc_never_deletes_a_path_an_image_label_names(engine, slug, smolvm_state, tmp_path, monkeypatch, hostile_image):
    home = tmp_path / "nest" / "home"
    monkeypatch.setenv("BOTTLE_HOME", str(home))
    canary = tmp_path / "nest" / "canary"  # what <home>/bottles/../../canary resolves to
    canary.mkdir(parents=True)
    (canary / "precious").write_text("keep")
    container = engine.containers.run(hostile_image, detach=True, name=f"{slug}-hostile", labels={TEST_LABEL: slug})

    listed = bottle("ls")
    assert listed.returncode == 0 and "foreign" in listed.stdout, listed.stderr
    result = bottle("gc")
    assert result.returncode == 0, result.stderr
    assert "removed" not in result.stdout
    assert f"left alone: container {slug}-hostile carries bottle's labels but its bottle.slug" in result.stderr
    assert (canary / "precious").read_text() == "keep"
    container.reload()
    assert container.status == "running"


def test_another_state_directory_can_neither_remove_nor_adopt_my_bottle(engine, slug, smolvm_state, home,
                                                                        write_manifest, tmp_path):  # fmt: skip
    manifest = write_manifest()
    assert bottle("up", "-f", str(manifest), "--detach").returncode == 0
    theirs = {"BOTTLE_HOME": str(tmp_path / "someone-else")}
    try:
        gc = bottle("gc", env=theirs)
        assert gc.returncode == 0 and "removed" not in gc.stdout, gc.stderr
        down = bottle("down", slug, env=theirs)
        assert (down.returncode, down.stdout) == (0, f"bottle '{slug}': nothing to remove\n"), down.stderr
        up = bottle("up", "-f", str(manifest), "--detach", env=theirs)
        assert up.returncode == 1 and "this bottle state directory did not create it" in up.stderr
        bundle = engine.containers.get(f"bottle-{slug}-bundle")
        assert bundle.status == "running"
        assert [n.name for n in engine.networks.list(filters={"label": f"{LABEL_SLUG}={slug}"})] == [f"bottle-{slug}"]
        # smolvm's machines are shared by every BOTTLE_HOME of a user: with my bundle and network gone,
        # the other home can neither adopt nor remove my machine.
        bundle.remove(force=True)
        engine.networks.get(f"bottle-{slug}").remove()
        up = bottle("up", "-f", str(manifest), "--detach", env=theirs)
        assert up.returncode == 1 and f"a smolvm machine named 'bottle-{slug}' exists but this bottle" in up.stderr
        assert bottle("down", slug, env=theirs).stdout == f"bottle '{slug}': nothing to remove\n"
        assert fake_smolvm.machines(smolvm_state)[f"bottle-{slug}"]["state"] == "running"
    finally:
        assert bottle("down", slug).returncode == 0
    assert leftovers(engine, slug, smolvm_state, home) == {}


def test_a_stranger_on_the_bottle_network_stops_adoption(engine, slug, smolvm_state, home, write_manifest):
    manifest = write_manifest()
    assert bottle("up", "-f", str(manifest), "--detach").returncode == 0
    running = engine.containers.run(MUTE_IMAGE, detach=True, name=f"{slug}-stranger", labels={TEST_LABEL: slug})
    stopped = engine.containers.create(MUTE_IMAGE, name=f"{slug}-sleeper", labels={TEST_LABEL: slug},
                                       network=f"bottle-{slug}")  # never started: it can be, later  # fmt: skip
    try:
        result = bottle("up", "-f", str(manifest), "--detach")
        assert result.returncode == 1
        assert f"has container '{slug}-sleeper' attached, which is not this bottle's own" in result.stderr
        stopped.remove(force=True)
        engine.networks.get(f"bottle-{slug}").connect(running)
        result = bottle("up", "-f", str(manifest), "--detach")
        assert result.returncode == 1
        assert f"has container '{slug}-stranger' attached, which is not this bottle's own" in result.stderr
        assert f"docker network disconnect -f bottle-{slug} {slug}-stranger" in result.stderr
    finally:
        running.remove(force=True)
        stopped.remove(force=True) if f"{slug}-sleeper" in [c.name for c in engine.containers.list(all=True)] else None
    assert bottle("down", slug).returncode == 0


def test_five_prepares_and_gcs_at_once_leave_one_consistent_bottle(engine, slug, smolvm_state, home, write_manifest):
    manifest = write_manifest()
    commands = [["prepare", "-f", str(manifest)]] * 5 + [["gc"]] * 3
    with ThreadPoolExecutor(len(commands)) as pool:
        results = list(pool.map(lambda args: bottle(*args), commands))
    assert [r.returncode for r in results] == [0] * len(commands), [r.stderr for r in results if r.returncode]
    assert len(engine.networks.list(filters={"label": f"{LABEL_SLUG}={slug}"})) == 1
    bottle_dir = home / "bottles" / slug
    ca = (bottle_dir / "bundle" / "ca" / "mitmproxy-ca.pem").read_bytes()  # the key, then its certificate
    assert ca.endswith((bottle_dir / "guest" / "ca.pem").read_bytes()) and b"PRIVATE KEY" in ca
    assert json.loads((bottle_dir / "plan.json").read_text())["network_id"] == engine.networks.get(f"bottle-{slug}").id
    assert bottle("down", slug).returncode == 0


def test_a_full_disk_during_prepare_leaves_no_network(engine, slug, smolvm_state, home, write_manifest):
    manifest = write_manifest()
    script = (
        'mount -t tmpfs -o size=64k tmpfs "$HOME_DIR"\n'
        '"$PY" -c "import sys; from pathlib import Path; from bottle.state import StateStore; '
        's = StateStore(Path(sys.argv[1])); s.owner(create=True); s.private_dir(s.root / \'locks\')" "$HOME_DIR"\n'
        'dd if=/dev/zero of="$HOME_DIR/filler" bs=4k 2>/dev/null || true\n'
        'exec "$PY" -m bottle prepare -f "$MANIFEST"\n'
    )
    home.mkdir()
    result = in_private_mounts(script, {"HOME_DIR": str(home), "MANIFEST": str(manifest)})
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"bottle: cannot ") and str(home) in line and "No space left on device" in line
    assert leftovers(engine, slug, smolvm_state, home) == {}


def test_down_on_a_read_only_state_directory_removes_the_rest_and_names_what_is_left(
    engine, slug, smolvm_state, home, write_manifest
):
    assert bottle("up", "-f", str(write_manifest()), "--detach").returncode == 0
    script = 'mount --bind "$HOME_DIR" "$HOME_DIR"\nmount -o remount,bind,ro "$HOME_DIR"\nexec "$PY" -m bottle down "$SLUG"\n'
    result = in_private_mounts(script, {"HOME_DIR": str(home), "SLUG": slug})
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"bottle: could not remove all of bottle '{slug}': state: cannot remove {home}/bottles/{slug}")
    assert "Read-only file system" in line and f"network bottle-{slug}" in line
    assert leftovers(engine, slug, smolvm_state, home) == {"state": True}
    assert bottle("down", slug).returncode == 0
    assert leftovers(engine, slug, smolvm_state, home) == {}


class DyingEngineProxy:
    """A unix socket in front of the Docker Engine that dies, every connection at once, at a chosen request."""

    def __init__(self, path: Path, upstream: str, dies_at: bytes, *, after_forwarding: bool = False):
        self.path, self.upstream, self.dies_at, self.after_forwarding = path, upstream, dies_at, after_forwarding
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen()
        self.open: list[socket.socket] = [self.listener]
        self.dead, self.swallowing = threading.Event(), threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.dead.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX)
            server.connect(self.upstream)
            self.open += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if not from_client and self.swallowing.is_set():
                    return  # the Engine answered; the answer is lost
                if from_client and self.dies_at in data:
                    if self.after_forwarding:  # the Engine gets the request...
                        self.swallowing.set()
                        sink.sendall(data)
                        time.sleep(1)
                    self.die()
                    return
                sink.sendall(data)
        except OSError:
            pass

    def die(self) -> None:
        self.dead.set()
        for sock in self.open:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


@pytest.mark.parametrize(
    ("dies_at", "after_forwarding", "step"),
    [(b"/start HTTP/1.1", False, "bundle start"), (b"/networks/create HTTP/1.1", True, "network")],
    ids=["before starting the bundle", "after creating the network"],
)
def test_the_engine_vanishing_mid_up_is_one_sentence_naming_the_fix(engine, slug, smolvm_state, home,
                                                                    write_manifest, tmp_path, dies_at,
                                                                    after_forwarding, step):  # fmt: skip
    upstream = engine.api.base_url  # http+docker://localhost for the local socket
    socket_path = "/var/run/docker.sock" if "localhost" in upstream else pytest.fail(f"unexpected engine {upstream}")
    proxy = DyingEngineProxy(tmp_path / "engine.sock", socket_path, dies_at, after_forwarding=after_forwarding)
    try:
        result = bottle("up", "-f", str(write_manifest()), "--detach", env={"DOCKER_HOST": f"unix://{proxy.path}"})
    finally:
        proxy.die()
    assert proxy.dead.is_set() and result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"bottle: step '{step}' failed: the Docker Engine stopped answering"), result.stderr
    assert f"`bottle down {slug}` removes them" in last and "Traceback" not in result.stderr
    assert bottle("down", slug).returncode == 0  # the command the sentence names does remove what was left
    assert leftovers(engine, slug, smolvm_state, home) == {}


@pytest.mark.parametrize("planted", ["bundle", "guest", ""])
def test_a_planted_link_in_the_state_directory_is_refused_and_its_target_untouched(
    engine, slug, smolvm_state, home, write_manifest, tmp_path, planted
):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    link = home / "bottles" / slug / planted if planted else home / "bottles" / slug
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    result = bottle("up", "-f", str(write_manifest()), "--detach")
    assert result.returncode == 1
    assert f"{link} is a symbolic link" in result.stderr and "Traceback" not in result.stderr
    assert list(target.iterdir()) == [] and stat.S_IMODE(target.stat().st_mode) == 0o755
    assert not [n for n in engine.networks.list(filters={"label": f"{LABEL_SLUG}={slug}"})]


def test_every_path_is_private_whatever_the_umask(engine, slug, smolvm_state, home, write_manifest):
    result = subprocess.run(
        ["sh", "-c", 'umask 000; exec "$0" -m bottle up -f "$1" --detach', sys.executable, str(write_manifest())],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    try:
        found = {p: stat.S_IMODE(p.lstat().st_mode) for p in [home, *home.rglob("*")]}
        certificate = home / "bottles" / slug / "guest" / "ca.pem"  # public, for the agent's user; no key

        def wanted(path):
            return 0o700 if path.is_dir() else 0o644 if path == certificate else 0o600

        assert {p: m for p, m in found.items() if m != wanted(p)} == {}
        assert any(p.suffix == ".tar" for p in found) and any(p.suffix == ".lock" for p in found)
    finally:
        bottle("down", slug)


def test_docker_client_errors_are_not_internal_errors(tmp_path):
    result = bottle("ls", env={"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"})
    assert result.returncode == 1
    assert "bottles not looked at: no Docker Engine is reachable" in result.stderr and "internal error" not in result.stderr


def test_a_failed_machine_delete_keeps_the_state_so_down_can_finish(engine, slug, smolvm_state, home, write_manifest):
    assert bottle("up", "-f", str(write_manifest()), "--detach").returncode == 0
    fake_smolvm.control(smolvm_state, fail="machine-delete")
    first = bottle("down", slug)
    assert first.returncode == 1 and f"state: kept {home}/bottles/{slug}" in first.stderr
    assert f"bottle-{slug}" in fake_smolvm.machines(smolvm_state)
    fake_smolvm.control(smolvm_state, fail=None)
    second = bottle("down", slug)
    assert second.returncode == 0 and f"removed machine bottle-{slug}" in second.stdout
    assert leftovers(engine, slug, smolvm_state, home) == {}


def test_a_planted_link_in_the_image_cache_is_neither_reused_nor_written_through(
    engine, slug, smolvm_state, home, write_manifest, tmp_path
):
    manifest = write_manifest()
    assert bottle("up", "-f", str(manifest), "--detach").returncode == 0
    assert bottle("down", slug).returncode == 0
    [artifact] = (home / "cache" / "images").glob("*.tar")
    victim = tmp_path / "victim"
    victim.write_text("not an artifact of ours")
    artifact.unlink()
    artifact.symlink_to(victim)
    result = bottle("up", "-f", str(manifest), "--detach")
    assert result.returncode == 0, result.stderr
    assert "reusing" not in result.stderr and "saving" in result.stderr
    assert victim.read_text() == "not an artifact of ours" and not artifact.is_symlink()
    assert bottle("down", slug).returncode == 0
