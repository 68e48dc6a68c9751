"""The bundle's proxy for real: mitmproxy with bottle's addon on loopback, upstreams of the test's own.

The upstream servers listen on the host's address on a docker bridge network this test creates
(private, so the allow rules opt that /24 in explicitly); names resolve through a table, never DNS.
"""

import http.client
import json
import socket
import ssl
from ipaddress import ip_address, ip_network

import pytest
from docker.types import IPAMConfig, IPAMPool

from bottle.backends.smolmachines.addressing import DEFAULT_POOL, derive_subnet, host_routes, ipv4_subnets
from bottle.bundle.ca import CA_FILE, create_ca
from bottle.bundle.policy import BundleConfig, Credential, Rule
from bottle.testing.upstream import echo_server, gateway_of, running_bundle
from tests.integration.conftest import TEST_LABEL

SECRET = "sk-ant-test-4b1d6a2e9f"


@pytest.fixture(scope="module")
def upstream_net(engine):
    taken = [s for n in engine.networks.list() for s in ipv4_subnets(n.attrs)] + host_routes()
    subnet = derive_subnet("proxy-upstreams", DEFAULT_POOL, taken)
    network = engine.networks.create(
        "bottle-test-proxy-upstreams",
        ipam=IPAMConfig(pool_configs=[IPAMPool(subnet=str(subnet), gateway=str(subnet.network_address + 1))]),
        labels={TEST_LABEL: "proxy"},
    )
    yield subnet, gateway_of(network.attrs)
    network.remove()


@pytest.fixture(scope="module")
def world(upstream_net, tmp_path_factory):
    """Upstreams (HTTPS and HTTP), the bundle's CA, and the proxy running with them; yields a dict."""
    subnet, gateway = upstream_net
    workdir = tmp_path_factory.mktemp("proxy")
    key, cert = create_ca("bottle test bundle CA")
    (workdir / CA_FILE).write_bytes(key + cert)
    (workdir / "bundle-ca.pem").write_bytes(cert)
    audit: list[dict] = []
    with echo_server(gateway, tls_names=["upstream.test", "other.test"], workdir=workdir) as tls_up, \
         echo_server(gateway) as plain_up:  # fmt: skip
        ports = [tls_up["port"], plain_up["port"]]
        table = {
            "upstream.test": gateway,
            "other.test": gateway,
            "loop.test": "127.0.0.1",
            "meta.test": "169.254.169.254",
            "lan.test": "192.168.250.9",
        }
        config = BundleConfig(
            allow=[Rule(host=h, ports=ports, cidrs=[subnet]) for h in ("upstream.test", "other.test")]
            + [Rule(host=h, ports=ports) for h in ("loop.test", "meta.test", "lan.test")]
            + [Rule(host="*.wild.test", ports=ports, cidrs=[subnet])],
            credentials=[Credential(host="upstream.test", header="x-api-key", template="{secret}", secret="c0")],
            refuse=[ip_network("192.168.38.0/24")],
        )

        def resolver(host, port):
            if host.endswith(".wild.test"):
                return [ip_address(gateway)]
            if host not in table:
                raise OSError("Name or service not known")
            return [ip_address(table[host])]

        with running_bundle(config, {"c0": SECRET}, workdir / CA_FILE, resolver, audit.append,
                            upstream_ca=tls_up["ca"]) as proxy_port:  # fmt: skip
            yield {"proxy": proxy_port, "tls": tls_up["port"], "plain": plain_up["port"], "audit": audit,
                   "client_ca": workdir / "bundle-ca.pem"}  # fmt: skip


def https_get(world, host, path="/echo", headers=None, host_header=None):
    context = ssl.create_default_context(cafile=str(world["client_ca"]))
    conn = http.client.HTTPSConnection("127.0.0.1", world["proxy"], context=context, timeout=10)
    conn.set_tunnel(host, world["tls"])
    conn.putrequest("GET", path, skip_host=True)
    conn.putheader("Host", host_header or host)
    for name, value in (headers or {}).items():
        conn.putheader(name, value)
    conn.endheaders()
    response = conn.getresponse()
    return response.status, response.read()


def http_get(world, host, path="/echo"):
    conn = http.client.HTTPConnection("127.0.0.1", world["proxy"], timeout=10)
    conn.request("GET", f"http://{host}:{world['plain']}{path}")
    response = conn.getresponse()
    return response.status, response.read()


def connect_status(world, host, port):
    """The proxy's whole reply to a CONNECT: status line, headers and (for a refusal) its body."""
    with socket.create_connection(("127.0.0.1", world["proxy"]), timeout=10) as conn:
        conn.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += conn.recv(4096)
        head, _, body = reply.partition(b"\r\n\r\n")
        length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0)
        while len(body) < length:
            body += conn.recv(4096)
        return (head + b"\r\n\r\n" + body).decode(errors="replace")


def test_an_allowed_host_is_reached_over_intercepted_tls_with_its_credential(world):
    status, body = https_get(world, "upstream.test", headers={"x-api-key": "the-agent-made-this-up"})
    assert status == 200
    assert json.loads(body)["headers"]["x-api-key"] == SECRET  # injected, replacing the agent's own


def test_the_credential_goes_to_its_host_and_no_other(world):
    status, body = https_get(world, "other.test")
    assert status == 200 and "x-api-key" not in {k.lower() for k in json.loads(body)["headers"]}
    status, body = http_get(world, "other.test")
    assert status == 200 and "x-api-key" not in {k.lower() for k in json.loads(body)["headers"]}


def test_plain_http_is_checked_and_injected_too(world):
    status, body = http_get(world, "upstream.test")
    assert status == 200 and json.loads(body)["headers"]["x-api-key"] == SECRET


def test_wildcard_rules_match_subdomains(world):
    assert http_get(world, "api.wild.test")[0] == 200
    assert http_get(world, "deep.api.wild.test")[0] == 200


@pytest.mark.parametrize("host", ["evil.test", "wild.test"])
def test_a_host_not_on_the_allowlist_gets_403_naming_it(world, host):
    reply = connect_status(world, host, world["tls"])
    assert reply.startswith("HTTP/1.1 403")
    assert f"{host} is not on this bottle's egress allowlist" in reply and "rule: no rule" in reply
    status, body = http_get(world, host)
    assert status == 403 and host.encode() in body


def test_an_allowed_host_on_another_port_is_refused(world):
    reply = connect_status(world, "upstream.test", 22)
    assert reply.startswith("HTTP/1.1 403") and "not 22" in reply


@pytest.mark.parametrize(
    ("host", "address"), [("loop.test", "127.0.0.1"), ("meta.test", "169.254.169.254"), ("lan.test", "192.168.250.9")]
)
def test_an_allowed_name_that_resolves_inward_is_refused(world, host, address):
    reply = connect_status(world, host, world["tls"])
    assert reply.startswith("HTTP/1.1 403") and f"resolves to {address}" in reply
    status, body = http_get(world, host)
    assert status == 403 and address.encode() in body


def test_a_host_header_for_another_host_inside_a_tunnel_is_refused(world):
    # Domain fronting: the tunnel goes to an allowed host, the request names another behind it.
    status, body = https_get(world, "upstream.test", host_header="other.test")
    assert status == 403 and b"the request names other.test but its connection is to upstream.test" in body
    assert https_get(world, "upstream.test", host_header="upstream.test:443")[0] == 200


def test_the_audit_log_has_every_request_and_no_secret(world):
    https_get(world, "upstream.test", path="/v1/messages?api_key=hunter2&beta=1")
    connect_status(world, "evil.test", 443)
    entries = world["audit"]
    logged = json.dumps(entries)
    assert SECRET not in logged and "hunter2" not in logged
    allowed = [e for e in entries if e.get("path") == "/v1/messages?api_key=REDACTED&beta=REDACTED"]
    assert allowed and allowed[-1]["decision"] == "allow" and allowed[-1]["status"] == 200
    assert allowed[-1]["method"] == "GET" and allowed[-1]["host"] == "upstream.test"
    assert allowed[-1]["bytes_in"] > 0 and allowed[-1]["rule"].startswith("upstream.test:")
    denied = [e for e in entries if e.get("host") == "evil.test" and e["decision"] == "deny"]
    assert denied and denied[-1]["method"] == "CONNECT" and denied[-1]["rule"] == "no rule"
    assert {"time", "method", "host", "port", "path", "decision", "rule", "status"} <= set(denied[-1])
