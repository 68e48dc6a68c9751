"""The confinement suite: proves a running bottle's boundary from inside its agent, whatever the backend.

Subclass `ConfinementSuite` in a test module and define, at class scope:

- `backend`: the Backend under test, able to `run` commands in its agent;
- `agent_image`: an image with python3 that the backend runs as the agent;
- `bundle_image`: a bottle bundle image (the suite derives one that also trusts its decoy's CA);
- `engine`: the real Docker Engine (`docker.DockerClient`).

The suite brings one bottle up for the class, with a manifest of its own: an allowlisted decoy upstream
(an HTTPS echo server in a container on a network of the suite's, its subnet opted in with `cidrs`, and a
credential for it). That network stands in for the internet: the suite attaches the bundle to it. Then,
from inside the agent, it shows:

- the bundle's proxy answers, and the decoy is reached through it with the credential injected there,
  while the credential is nowhere in the agent's environment, files or process list;
- a host not on the allowlist, and any address given as a raw IP, get the bundle's 403;
- direct connections fail: to the decoy, to the bundle on any port but the proxy's (and DNS, which
  refuses), to the gateway of every network the bundle is on (a listener on the host, on every address,
  must record nothing, over TCP or UDP), and to a port the host publishes;
- DNS resolves nothing: every query goes to the bundle, which refuses it and logs it.

Every packet goes only to containers and networks the suite (or the bottle) created, and to the host.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import tarfile
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Network, ip_network
from typing import Any

import docker
import pytest

from bottle.addressing import DEFAULT_POOL, derive_subnet, host_routes, ipv4_subnets
from bottle.backend import Backend
from bottle.backends.smolmachines.probe import listener
from bottle.bundle.ca import create_ca
from bottle.manifest import parse_manifest
from bottle.plan import BottlePlan
from bottle.sidecar import PROXY_PORT
from bottle.state import StateStore
from bottle.testing.upstream import free_port, issue_certificate

TEST_LABEL = "bottle.test"
SECRET_ENV = "BOTTLE_CONFINEMENT_SECRET"
CREDENTIAL_HEADER = "x-bottle-confinement"

# Runs in the agent: one operation, given as JSON, and its result as JSON on stdout.
PROBE = r"""
import json, os, socket, ssl, struct, sys, urllib.request
op = json.loads(sys.argv[1])
kind = op["op"]

def tcp(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "open"
    except OSError as exc:
        return type(exc).__name__ + ": " + str(exc)

def udp(host, port):
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            s.settimeout(2)
            s.sendto(b"bottle-confinement", (host, port))
            return "answered: " + s.recv(512).hex()
    except OSError as exc:
        return type(exc).__name__ + ": " + str(exc)

def udp_bound(host, port):
    # Name the interface on the socket, as any unprivileged process may: no route is needed then.
    sent = []
    for index, name in socket.if_nameindex():
        if name == "lo":
            continue
        for how in ("SO_BINDTODEVICE", "IP_UNICAST_IF", "IP_PKTINFO"):
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                    payload = f"bottle-confinement {how} {name}".encode()
                    if how == "SO_BINDTODEVICE":
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, name.encode())
                        s.sendto(payload, (host, port))
                    elif how == "IP_UNICAST_IF":
                        s.setsockopt(socket.IPPROTO_IP, 50, struct.pack("!I", index))
                        s.sendto(payload, (host, port))
                    else:
                        info = struct.pack("=I4s4s", index, bytes(4), bytes(4))
                        s.sendmsg([payload], [(socket.IPPROTO_IP, 8, info)], 0, (host, port))
                    sent.append(f"{how} {name}")
            except OSError as exc:
                sent.append(f"{how} {name}: {exc}")
    return sent

def get(url):
    context = ssl.create_default_context(cafile="/etc/bottle/ca.pem")
    try:
        with urllib.request.urlopen(url, timeout=15, context=context) as response:
            return {"status": response.status, "body": response.read().decode()}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read().decode(errors="replace")}
    except Exception as exc:
        return {"error": type(exc).__name__ + ": " + str(exc)}

def resolve(name):
    try:
        return sorted({i[4][0] for i in socket.getaddrinfo(name, 443)})
    except OSError as exc:
        return type(exc).__name__ + ": " + str(exc)

def dns(server, name):
    query = struct.pack(">HHHHHH", 0x6274, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.sendto(query, (server, 53))
            return {"rcode": s.recv(512)[3] & 0x0F}
    except OSError as exc:
        return {"error": type(exc).__name__ + ": " + str(exc)}

def find(head, tail):
    needle = (head + tail).encode()  # given in halves, so that this probe's own command line never holds it
    found = [f"env {k}" for k, v in os.environ.items() if needle in v.encode()]
    for root, dirs, files in os.walk("/"):
        if root == "/":
            dirs[:] = [d for d in dirs if d not in ("sys", "dev")]
        if root == "/proc":
            dirs[:] = [d for d in dirs if d.isdigit() and d != str(os.getpid())]
        if root.startswith("/proc/"):
            dirs[:] = []
            files = [f for f in files if f in ("environ", "cmdline")]
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    if needle in f.read(64 << 20):
                        found.append(path)
            except OSError:
                pass
    return found

result = {"tcp": lambda: tcp(op["host"], op["port"]), "udp": lambda: udp(op["host"], op["port"]),
          "udp_bound": lambda: udp_bound(op["host"], op["port"]),
          "get": lambda: get(op["url"]), "resolve": lambda: resolve(op["name"]),
          "dns": lambda: dns(op["server"], op["name"]), "find": lambda: find(op["head"], op["tail"])}[kind]()
print(json.dumps(result))
"""

# Runs in the decoy: an HTTPS server that answers every GET with the headers it received.
DECOY = r"""
import http.server, json, ssl
class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path, "headers": dict(self.headers)}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("0.0.0.0", 443), Echo)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain("/decoy/cert.pem", "/decoy/key.pem")
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""


def trusting_image(engine: docker.DockerClient, bundle_image: str, ca_pem: bytes, tag: str) -> str:
    """`bundle_image` with one more CA in the trust store its proxy verifies upstreams with (certifi's)."""
    dockerfile = (
        f"FROM {bundle_image}\nUSER 0\nCOPY ca.pem /tmp/extra-ca.pem\n"
        "RUN /opt/bundle/bin/python -c \"import certifi; open(certifi.where(), 'ab').write(open('/tmp/extra-ca.pem', "
        "'rb').read())\" && rm /tmp/extra-ca.pem\nUSER 65534:65534\n"
    )
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data in (("Dockerfile", dockerfile.encode()), ("ca.pem", ca_pem)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    engine.images.build(fileobj=context, custom_context=True, tag=tag, labels={TEST_LABEL: "confinement"}, rm=True)
    return tag


def gateways(engine: docker.DockerClient, container_name: str) -> dict[str, str]:
    """The gateway address (.1) of every network a container is attached to, by network name."""
    container = engine.containers.get(container_name)
    found = {}
    for name in container.attrs["NetworkSettings"]["Networks"]:
        for subnet in ipv4_subnets(engine.networks.get(name).attrs):
            found[name] = str(subnet.network_address + 1)
    return found


class Bottle:
    """What the suite brought up: the plan, and the addresses its cases aim at."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    plan: BottlePlan
    decoy_name: str
    decoy_ip: str
    decoy_subnet: IPv4Network
    published_port: int
    secret: str
    listener_port: int
    seen: list[str]
    gateways: dict[str, str]


class ConfinementSuite:
    """Cases every backend's running bottle must pass; see the module's docstring."""

    @pytest.fixture(scope="class")
    @classmethod
    def bottle(cls, backend: Backend, engine: docker.DockerClient, agent_image: str, bundle_image: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bottle]:  # fmt: skip
        run_id = f"conf-{uuid.uuid4().hex[:8]}"
        label = {TEST_LABEL: run_id}
        work = tmp_path_factory.mktemp("confinement")
        ca_key, ca_cert = create_ca("bottle confinement suite decoy CA")
        decoy_name = f"{run_id}-decoy"
        key, cert = issue_certificate(ca_key, ca_cert, [decoy_name])
        decoy_dir = work / "decoy"
        decoy_dir.mkdir()
        for name, data in (("key.pem", key), ("cert.pem", cert)):
            (decoy_dir / name).write_bytes(data)
        os.chmod(decoy_dir, 0o755)
        trusting = f"bottle-test-bundle:trusts-{hashlib.sha256(ca_cert).hexdigest()[:12]}"
        secret = f"bottle-secret-{secrets.token_hex(16)}"
        previous = os.environ.get(SECRET_ENV)
        os.environ[SECRET_ENV] = secret
        state = StateStore(work / "home")
        plan = None
        try:
            trusting_image(engine, bundle_image, ca_cert, trusting)
            taken = [s for n in engine.networks.list() for s in ipv4_subnets(n.attrs)] + host_routes()
            decoy_subnet = derive_subnet(f"{run_id}-decoys", DEFAULT_POOL, taken)
            decoy_net = engine.networks.create(
                f"{run_id}-decoys", labels=label,
                ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=str(decoy_subnet))]),
            )  # fmt: skip
            published = free_port("0.0.0.0")
            decoy = engine.containers.run(
                agent_image, ["python3", "-c", DECOY], name=decoy_name, network=decoy_net.name, detach=True,
                labels=label, volumes={str(decoy_dir): {"bind": "/decoy", "mode": "ro"}},
                ports={"443/tcp": ("0.0.0.0", published)},
            )  # fmt: skip
            decoy.reload()
            decoy_ip = decoy.attrs["NetworkSettings"]["Networks"][decoy_net.name]["IPAddress"]
            manifest = parse_manifest({
                "name": run_id,
                "backend": backend.name,
                "agent": {"image": agent_image, "command": ["sh"]},
                "egress": {
                    "allow": [{"host": decoy_name, "ports": [443], "cidrs": [str(decoy_subnet)]}],
                    "credentials": [{"host": decoy_name, "header": CREDENTIAL_HEADER, "from_env": SECRET_ENV}],
                },
                "bundle": {"image": trusting},
            })  # fmt: skip
            report = backend.preflight(docker=engine)
            plan = backend.up(manifest, docker=engine, state=state, preflight=report, on_step=lambda s, d: None)
            decoy_net.connect(plan.bundle_container_name)  # type: ignore[attr-defined]
            with listener("0.0.0.0") as (port, seen):  # every host address, TCP and UDP
                yield Bottle(
                    plan=plan, decoy_name=decoy_name, decoy_ip=decoy_ip, decoy_subnet=decoy_subnet,
                    published_port=published, secret=secret, listener_port=port, seen=seen,
                    gateways=gateways(engine, plan.bundle_container_name),  # type: ignore[attr-defined]
                )  # fmt: skip
        finally:
            if previous is None:
                os.environ.pop(SECRET_ENV, None)
            else:
                os.environ[SECRET_ENV] = previous
            backend.down(run_id, docker=engine, state=state)
            for container in engine.containers.list(all=True, filters={"label": f"{TEST_LABEL}={run_id}"}):
                container.remove(force=True)
            for network in engine.networks.list(filters={"label": f"{TEST_LABEL}={run_id}"}):
                network.remove()
            try:
                engine.images.remove(trusting, force=True)
            except docker.errors.ImageNotFound:
                pass

    # -- helpers ---------------------------------------------------------------------------------------

    @staticmethod
    def probe(backend: Backend, engine: docker.DockerClient, bottle: Bottle, **op: Any) -> Any:
        code, output = backend.run(bottle.plan, ["python3", "-c", PROBE, json.dumps(op)], docker=engine, timeout=60)
        assert code == 0, f"the probe failed in the agent (exit {code}): {output[-500:]}"
        return json.loads(output.strip().splitlines()[-1])

    @staticmethod
    def audit(engine: docker.DockerClient, bottle: Bottle) -> list[dict[str, Any]]:
        logs = engine.containers.get(bottle.plan.bundle_container_name).logs(stdout=True, stderr=False)  # type: ignore[attr-defined]
        entries = []
        for line in logs.decode(errors="replace").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries

    @staticmethod
    def nothing_seen(bottle: Bottle) -> None:
        time.sleep(0.5)  # a datagram may still be on its way
        assert bottle.seen == [], f"the host listener was reached from the agent: {bottle.seen}"

    # -- the allowlisted path ------------------------------------------------------------------------------

    def test_the_proxy_answers(self, backend, engine, bottle) -> None:
        assert self.probe(backend, engine, bottle, op="tcp", host=str(bottle.plan.bundle_ip), port=PROXY_PORT) == "open"

    def test_the_decoy_is_reached_through_the_bundle_with_the_credential_added_there(self, backend, engine, bottle):
        got = self.probe(backend, engine, bottle, op="get", url=f"https://{bottle.decoy_name}/hello?q=1")
        assert got.get("status") == 200, got
        echoed = json.loads(got["body"])
        assert echoed["path"] == "/hello?q=1"
        assert {k.lower(): v for k, v in echoed["headers"].items()}[CREDENTIAL_HEADER] == bottle.secret
        audit = self.audit(engine, bottle)
        entries = [e for e in audit if e.get("host") == bottle.decoy_name]
        assert entries and entries[-1]["decision"] == "allow"
        assert bottle.secret not in json.dumps(audit)

    def test_the_credential_is_nowhere_in_the_agent(self, backend, engine, bottle) -> None:
        half = len(bottle.secret) // 2
        found = self.probe(backend, engine, bottle, op="find", head=bottle.secret[:half], tail=bottle.secret[half:])
        assert found == [], f"the credential is in the agent at {found}"

    # -- the bundle's policy ---------------------------------------------------------------------------------

    def test_a_host_off_the_allowlist_gets_the_bundles_403(self, backend, engine, bottle) -> None:
        name = f"not-allowed-{uuid.uuid4().hex[:8]}.invalid"
        for url in (f"https://{name}/", f"http://{name}/"):
            got = self.probe(backend, engine, bottle, op="get", url=url)
            assert got.get("status") == 403 or "403" in got.get("error", ""), (url, got)
        assert any(e.get("host") == name and e["decision"] == "deny" for e in self.audit(engine, bottle))

    def test_a_raw_ip_gets_the_bundles_403(self, backend, engine, bottle) -> None:
        for url in (f"https://{bottle.decoy_ip}/", f"http://{bottle.decoy_ip}:443/"):
            got = self.probe(backend, engine, bottle, op="get", url=url)
            assert got.get("status") == 403 or "403" in got.get("error", ""), (url, got)

    # -- direct paths ------------------------------------------------------------------------------------------

    def test_the_decoy_cannot_be_reached_directly(self, backend, engine, bottle) -> None:
        for port in (443, bottle.listener_port):
            assert self.probe(backend, engine, bottle, op="tcp", host=bottle.decoy_ip, port=port) != "open"

    def test_the_bundle_answers_on_no_other_port(self, backend, engine, bottle) -> None:
        bundle = str(bottle.plan.bundle_ip)
        for port in (22, 80, 443, 1080, 3128, 8080, 8081, 8443, 8889, 9090):
            assert self.probe(backend, engine, bottle, op="tcp", host=bundle, port=port) != "open", port

    def test_no_gateway_reaches_the_host(self, backend, engine, bottle) -> None:
        assert bottle.gateways, "the bundle is on no network with a gateway"
        for network, gateway in bottle.gateways.items():
            for op in ("tcp", "udp"):
                got = self.probe(backend, engine, bottle, op=op, host=gateway, port=bottle.listener_port)
                assert got != "open" and not got.startswith("answered"), (network, gateway, op, got)
        self.nothing_seen(bottle)

    def test_no_broadcast_reaches_the_host(self, backend, engine, bottle) -> None:
        subnet_broadcast = str(ip_network(f"{bottle.plan.bundle_ip}/24", strict=False).broadcast_address)
        for target in ("255.255.255.255", subnet_broadcast):
            self.probe(backend, engine, bottle, op="udp", host=target, port=bottle.listener_port)
        self.nothing_seen(bottle)

    def test_no_packet_reaches_the_host_from_a_socket_that_names_its_interface(self, backend, engine, bottle):
        """SO_BINDTODEVICE, IP_UNICAST_IF and IP_PKTINFO need no capability and no route: broadcast,
        multicast and every gateway (the host's own addresses), UDP to the host listener only."""
        for target in ("255.255.255.255", "224.0.0.1", *bottle.gateways.values()):
            self.probe(backend, engine, bottle, op="udp_bound", host=target, port=bottle.listener_port)
        self.nothing_seen(bottle)

    def test_no_port_the_host_publishes_is_reached(self, backend, engine, bottle) -> None:
        for gateway in bottle.gateways.values():
            got = self.probe(backend, engine, bottle, op="tcp", host=gateway, port=bottle.published_port)
            assert got != "open", (gateway, got)

    # -- DNS -----------------------------------------------------------------------------------------------------

    def test_names_resolve_to_nothing_and_every_query_is_refused_by_the_bundle(self, backend, engine, bottle):
        name = f"leak-check-{uuid.uuid4().hex[:8]}.invalid"
        for target in (name, bottle.decoy_name):
            got = self.probe(backend, engine, bottle, op="resolve", name=target)
            assert isinstance(got, str), f"{target} resolved in the agent to {got}"
        refused = [e for e in self.audit(engine, bottle) if e.get("event") == "dns" and e.get("name") == name]
        assert refused and {e["decision"] for e in refused} == {"refused"}

    def test_the_bundle_refuses_dns_asked_directly(self, backend, engine, bottle) -> None:
        got = self.probe(backend, engine, bottle, op="dns", server=str(bottle.plan.bundle_ip), name="example.invalid")
        assert got == {"rcode": 5}  # REFUSED

    def test_no_gateway_answers_dns(self, backend, engine, bottle) -> None:
        for gateway in bottle.gateways.values():
            got = self.probe(backend, engine, bottle, op="dns", server=gateway, name="example.invalid")
            assert "rcode" not in got, (gateway, got)

