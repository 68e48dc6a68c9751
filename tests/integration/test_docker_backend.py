"""The docker backend end to end on the real Engine, through the `bottle` command as a user runs it."""

import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import docker
import pytest

from tests.integration.conftest import TEST_LABEL, bottle


@pytest.fixture
def manifest(tmp_path, slug, python_base, bundle_image):
    def write(allow: str = "pypi.org", agent_image: str = python_base, extra: str = "") -> str:
        path = tmp_path / "bottle.toml"
        path.write_text(
            f'name = "{slug}"\nbackend = "docker"\n[agent]\nimage = "{agent_image}"\ncommand = ["bash"]\n'
            f'[egress]\nallow = ["{allow}"]\n[bundle]\nimage = "{bundle_image}"\n{extra}'
        )
        return str(path)

    return write


def everything(engine, slug, home):
    label = {"label": f"bottle.slug={slug}"}
    found = {
        "networks": sorted(n.name for n in engine.networks.list(filters=label)),
        "containers": sorted(c.name for c in engine.containers.list(all=True, filters=label)),
        "state": (home / "bottles" / slug).exists(),
    }
    return {k: v for k, v in found.items() if v}


def test_up_attach_ls_down(engine, slug, home, manifest):
    path = manifest()
    result = bottle("up", "-f", path, "--detach")
    assert result.returncode == 0, result.stderr
    assert everything(engine, slug, home) == {
        "networks": [f"bottle-{slug}", f"bottle-{slug}-egress"],
        "containers": [f"bottle-{slug}-agent", f"bottle-{slug}-bundle"],
        "state": True,
    }
    agent = engine.containers.get(f"bottle-{slug}-agent").attrs
    host = agent["HostConfig"]
    assert list(agent["NetworkSettings"]["Networks"]) == [f"bottle-{slug}"]
    assert engine.networks.get(f"bottle-{slug}").attrs["Internal"] is True
    assert (host["CapDrop"], host["ReadonlyRootfs"], host["SecurityOpt"][0], host["Privileged"]) == (
        ["ALL"], True, "no-new-privileges", False)  # fmt: skip
    assert host["SecurityOpt"][1].startswith('seccomp={"defaultAction"')  # bottle's profile: see the vsock test
    assert (host["PidsLimit"], host["Memory"], host["NanoCpus"]) == (1024, 2 << 30, 2 * 10**9)
    assert agent["Config"]["User"] == "65534:65534"  # the tests run as root: nobody, never root
    assert not host.get("Binds") or all(":/var/run/docker.sock" not in b for b in host["Binds"])
    bundle = engine.containers.get(f"bottle-{slug}-bundle").attrs["HostConfig"]
    assert (bundle["Memory"], bundle["PidsLimit"], bundle["Sysctls"]) == (1 << 30, 256, {"net.ipv4.ip_forward": "0", "net.ipv4.conf.all.arp_ignore": "1"})

    # The host reaches the bundle's egress address (that is how `up` waits for it) but the proxy serves
    # the agent's network alone: a host user's request is closed unread and logged.
    plan = json.loads((home / "bottles" / slug / "plan.json").read_text())
    with socket.create_connection((plan["egress_ip"], 8888), timeout=5) as conn:
        conn.sendall(b"GET http://pypi.org/ HTTP/1.1\r\nHost: pypi.org\r\n\r\n")
        try:
            assert conn.recv(1024) == b""
        except ConnectionResetError:
            pass
    refused = [json.loads(line) for line in bottle("logs", slug, "--json").stdout.splitlines()]
    assert refused and all(e["event"] == "client" and e["decision"] == "refused" for e in refused), refused

    # `up` of a running bottle attaches: the command runs in the agent's container, its exit code is ours.
    script = "id -u; cat /proc/net/route | wc -l; echo $HTTPS_PROXY; pwd; exit 7"
    attached = subprocess.run([sys.executable, "-m", "bottle", "up", "-f", path], input=script, text=True,
                              capture_output=True, timeout=120)  # fmt: skip
    uid, routes, proxy, cwd = attached.stdout.split()
    assert attached.returncode == 7, attached.stderr
    assert (uid, routes, cwd) == ("65534", "2", "/workspace")  # the header and the bottle's /24: no default route
    assert proxy.startswith("http://") and proxy.endswith(":8888")

    [row] = [r for r in json.loads(bottle("ls", "--json").stdout) if r["slug"] == slug]
    assert (row["state"], row["backend"], row["drift"]) == ("running", "docker", [])
    assert bottle("down", slug).returncode == 0
    assert everything(engine, slug, home) == {}


def test_a_changed_allowlist_takes_effect_at_the_next_up(engine, slug, home, manifest):
    assert bottle("up", "-f", manifest(allow="pypi.org"), "--detach").returncode == 0
    before = {c.name: c.id for c in engine.containers.list(filters={"label": f"bottle.slug={slug}"})}
    assert bottle("up", "-f", manifest(allow="pypi.org"), "--detach").returncode == 0
    unchanged = {c.name: c.id for c in engine.containers.list(filters={"label": f"bottle.slug={slug}"})}
    assert unchanged == before  # nothing changed, nothing restarted
    assert bottle("up", "-f", manifest(allow="files.pythonhosted.org"), "--detach").returncode == 0
    after = {c.name: c.id for c in engine.containers.list(filters={"label": f"bottle.slug={slug}"})}
    assert after[f"bottle-{slug}-bundle"] != before[f"bottle-{slug}-bundle"]  # restarted with the new policy
    assert after[f"bottle-{slug}-agent"] == before[f"bottle-{slug}-agent"]
    config = engine.containers.get(f"bottle-{slug}-bundle").exec_run(["cat", "/etc/bottle/config.json"]).output
    assert [r["host"] for r in json.loads(config)["allow"]] == ["files.pythonhosted.org"]
    assert bottle("down", slug).returncode == 0


@pytest.mark.parametrize(
    ("extra", "step", "words"),
    [
        ('[docker]\nruntime = "no-such-runtime"\n', "agent", "has no runtime named 'no-such-runtime'"),
        ('[docker]\nworkspace = "/nonexistent/bottle-workspace"\n', "agent", "is not a directory"),
    ],
)
def test_a_failing_up_says_why_and_leaves_nothing(engine, slug, home, manifest, extra, step, words):
    result = bottle("up", "-f", manifest(extra=extra), "--detach")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"bottle: step '{step}' failed: ") and words in last, result.stderr
    assert last.endswith("what this run created was removed")
    assert everything(engine, slug, home) == {}


def test_a_missing_agent_image_is_one_sentence_and_leaves_nothing(engine, slug, home, manifest):
    result = bottle("up", "-f", manifest(agent_image="bottle-test-no-such-image:never"), "--detach")
    assert result.returncode == 1
    assert ("step 'agent' failed: the agent image 'bottle-test-no-such-image:never' is not on this machine; "
            "`docker pull` it or build it first") in result.stderr  # fmt: skip
    assert everything(engine, slug, home) == {}


def test_an_image_whose_user_is_root_by_another_spelling_runs_as_nobody(engine, slug, home, manifest, python_base):
    tag = f"bottle-test-rootish:{slug}"
    engine.images.build(fileobj=io.BytesIO(f"FROM {python_base}\nUSER 00\n".encode()), tag=tag,
                        labels={TEST_LABEL: slug}, rm=True)  # fmt: skip
    try:
        assert bottle("up", "-f", manifest(agent_image=tag), "--detach").returncode == 0
        agent = engine.containers.get(f"bottle-{slug}-agent")
        assert agent.exec_run(["id", "-u"]).output.strip() == b"65534"
    finally:
        bottle("down", slug)
        try:
            engine.images.remove(tag, force=True)
        except docker.errors.ImageNotFound:
            pass


def test_a_bottle_not_run_as_root_filters_the_bridge_through_a_helper(engine, slug, home, manifest, monkeypatch):
    """As a docker-group user, bottle cannot write /proc/sys itself: the privileged one-shot helper does."""
    from bottle.backends.docker import launch
    from bottle.backends.docker.plan import DockerBottlePlan
    from bottle.state import StateStore

    assert bottle("up", "-f", manifest(), "--detach").returncode == 0
    try:
        plan = DockerBottlePlan.model_validate_json((home / "bottles" / slug / "plan.json").read_text())
        setting = Path(f"/proc/sys/net/ipv4/conf/br-{plan.network_id[:12]}/rp_filter")
        no_ipv6 = Path(f"/proc/sys/net/ipv6/conf/br-{plan.network_id[:12]}/disable_ipv6")
        assert setting.read_text().strip() == no_ipv6.read_text().strip() == "1"  # what `up` set
        setting.write_text("0\n")
        no_ipv6.write_text("0\n")
        monkeypatch.setattr(launch.os, "geteuid", lambda: 1000)
        monkeypatch.setattr(launch.noroute, "rp_filter", lambda name: pytest.fail("wrote /proc/sys directly"))
        launch.shut_host_off(engine, plan, StateStore(home).owner())
        assert setting.read_text().strip() == no_ipv6.read_text().strip() == "1"
        assert engine.containers.list(all=True, filters={"label": ["bottle.role=helper", f"bottle.slug={slug}"]}) == []
    finally:
        bottle("down", slug)


def test_the_agent_cannot_open_vsock_or_make_a_user_namespace(engine, slug, home, manifest):
    """vsock reaches the hypervisor past every network namespace; a user namespace widens the kernel
    surface. The Engine here allows the first by default: bottle's seccomp profile shuts both."""
    assert bottle("up", "-f", manifest(), "--detach").returncode == 0
    try:
        agent = engine.containers.get(f"bottle-{slug}-agent")
        script = (
            "import socket, subprocess\n"
            "try:\n    socket.socket(40, socket.SOCK_STREAM); print('vsock open')\n"
            "except OSError as exc:\n    print('vsock', exc.errno)\n"
            "print('unshare', subprocess.run(['unshare', '-U', 'true']).returncode)\n"
            "print('inet', socket.socket().family)\n"
        )
        said = agent.exec_run(["python3", "-c", script], stderr=False).output.decode().split("\n")
        assert said[:3] == ["vsock 97", "unshare 1", "inet 2"], said
    finally:
        bottle("down", slug)
