"""The real bundle image: built from a local base, run by `bottle up` at the pinned IP, used by a
client container on the bottle's network to reach a decoy upstream container of the test's own."""

import json

import docker
import pytest
from docker.types import IPAMConfig, IPAMPool

from bottle.addressing import DEFAULT_POOL, derive_subnet, host_routes, ipv4_subnets
from bottle.bundle import CA_DIR
from bottle.bundle.ca import CA_FILE, split_ca
from bottle.testing.images import READY_IMAGE
from tests.integration.conftest import TEST_LABEL, bottle


@pytest.fixture
def decoy(engine, slug):
    """A decoy upstream (busybox httpd on 8888) on a network of its own; yields (name, subnet, network)."""
    taken = [s for n in engine.networks.list() for s in ipv4_subnets(n.attrs)] + host_routes()
    subnet = derive_subnet(f"{slug}-decoys", DEFAULT_POOL, taken)
    network = engine.networks.create(
        f"{slug}-decoys", ipam=IPAMConfig(pool_configs=[IPAMPool(subnet=str(subnet))]), labels={TEST_LABEL: slug}
    )
    name = f"{slug}-decoy"
    engine.containers.run(READY_IMAGE, name=name, network=network.name, detach=True, labels={TEST_LABEL: slug})
    yield name, subnet, network


def wget_through(engine, network: str, proxy: str, url: str, slug: str) -> str:
    """Fetch `url` from a container on `network` (standing in for the VM) through the bundle's proxy."""
    try:
        return engine.containers.run(
            READY_IMAGE,
            ["timeout", "20", "wget", "-O", "-", url],  # (busybox wget -T crashes in a static build)
            environment={"http_proxy": proxy},
            network=network,
            labels={TEST_LABEL: slug},
            remove=True,
        ).decode()
    except docker.errors.ContainerError as exc:
        return (exc.stderr or b"").decode()


def test_the_bundle_lets_through_the_allowlist_and_nothing_else(engine, slug, smolvm_state, tmp_path, bundle_image,
                                                                decoy, monkeypatch):  # fmt: skip
    monkeypatch.setenv("BOTTLE_HOME", str(tmp_path / "home"))
    name, subnet, decoy_network = decoy
    manifest = tmp_path / "bottle.toml"
    manifest.write_text(
        f'name = "{slug}"\n[agent]\nimage = "node:22"\n'
        f'[egress]\nallow = [{{ host = "{name}", ports = [8888], cidrs = ["{subnet}"] }}]\n'
        f'[bundle]\nimage = "{bundle_image}"\n'
    )
    result = bottle("up", "-f", str(manifest), "--detach")
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "home" / "bottles" / slug / "plan.json").read_text())
    bundle = engine.containers.get(plan["bundle_container_name"])
    decoy_network.connect(bundle)  # the decoy is a private service the rule opts in

    proxy = f"http://{plan['bundle_ip']}:8888"
    reached = wget_through(engine, plan["network_name"], proxy, f"http://{name}:8888/", slug)
    assert "404 Not Found" in reached  # busybox httpd's answer: the request got to the decoy
    refused = wget_through(engine, plan["network_name"], proxy, f"http://{name}.example:8888/", slug)
    assert "403 Forbidden" in refused
    wrong_port = wget_through(engine, plan["network_name"], proxy, f"http://{name}:8080/", slug)
    assert "403 Forbidden" in wrong_port
    # HTTPS, whose TLS with the agent the front door completes with this image's Python: the client verifies
    # the bottle's CA for the decoy's name and its request reaches mitmproxy, whose upstream TLS then fails
    # (the decoy speaks plain HTTP): a 502 and an error line.
    _, ca_cert = split_ca((tmp_path / "home" / "bottles" / slug / "bundle" / CA_DIR / CA_FILE).read_bytes())
    script = (
        "import http.client, os, ssl\n"
        f"conn = http.client.HTTPSConnection('{plan['bundle_ip']}', 8888, timeout=20,\n"
        "                                    context=ssl.create_default_context(cadata=os.environ['CA']))\n"
        f"conn.set_tunnel('{name}', 8888)\n"
        "conn.request('GET', '/')\n"
        "print(conn.sock.version(), conn.getresponse().status)\n"
    )
    answered = engine.containers.run(bundle_image, ["-c", script], entrypoint=["/opt/bundle/bin/python"],
                                     environment={"CA": ca_cert.decode()}, network=plan["network_name"],
                                     labels={TEST_LABEL: slug}, remove=True)  # fmt: skip
    assert answered.decode().split() == ["TLSv1.3", "502"]

    logs = [json.loads(line) for line in bottle("logs", slug, "--json").stdout.splitlines()]
    assert [(e["method"], e["decision"]) for e in logs if e["host"] == name and e["port"] == 8888] == [
        ("GET", "allow"), ("CONNECT", "allow"), ("GET", "error")
    ]
    assert {e["host"] for e in logs if e["decision"] == "deny"} == {f"{name}.example", name}
    denied = bottle("logs", slug, "--denied").stdout
    assert f"DENY   GET {name}.example:8888/" in denied and "ALLOW" not in denied

    decoy_network.disconnect(bundle)
    assert bottle("down", slug).returncode == 0


def test_a_bad_config_stops_the_bundle_with_a_message(engine, slug, bundle_image, tmp_path):
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    (config_dir / "config.json").write_text('{"allow": [{"host": "x.example", "ports": [99999]}]}')
    with pytest.raises(docker.errors.ContainerError) as info:
        engine.containers.run(
            bundle_image, volumes={str(config_dir): {"bind": "/etc/bottle", "mode": "ro"}},
            labels={TEST_LABEL: slug}, remove=True,
        )  # fmt: skip
    assert info.value.exit_status == 2
    assert b"invalid bundle config /etc/bottle/config.json: allow.0.ports.0" in info.value.stderr
    assert b"refusing to start" in info.value.stderr
