"""The bundle's proxy for real: mitmproxy with bottle's addon on loopback, upstreams of the test's own.

The upstream servers listen on the host's address on a docker bridge network this test creates
(private, so the allow rules opt that /24 in explicitly); names resolve through a table, never DNS.
"""

import gc
import http.client
import json
import os
import re
import socket
import ssl
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from ipaddress import ip_address, ip_network

import pytest
from docker.types import IPAMConfig, IPAMPool

from bottle.bundle.addon import DECISION_TTL
from bottle.addressing import DEFAULT_POOL, derive_subnet, host_routes, ipv4_subnets
from bottle.bundle.ca import CA_FILE, create_ca
from bottle.bundle.front import AgentTLS
from bottle.bundle.policy import BundleConfig, Credential, Rule
from bottle.testing.upstream import echo_server, free_port, gateway_of, running_bundle
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
    (workdir / "untrusted").mkdir()
    key, cert = create_ca("bottle test bundle CA")
    (workdir / CA_FILE).write_bytes(key + cert)
    (workdir / "bundle-ca.pem").write_bytes(cert)
    audit: list[dict] = []
    with echo_server(gateway, tls_names=["upstream.test", "other.test", "flip.test", "pass.test"], workdir=workdir,
                     keep_alive=True) as tls_up, \
         echo_server(gateway) as plain_up, \
         echo_server(gateway, keep_alive=True) as plain_kept, \
         echo_server(gateway, tls_names=["untrusted.test"], workdir=workdir / "untrusted") as untrusted_up:  # fmt: skip
        closed = _closed_port(gateway)
        ports = [tls_up["port"], plain_up["port"], plain_kept["port"], untrusted_up["port"], closed]
        table = {
            "upstream.test": gateway,
            "other.test": gateway,
            "pass.test": gateway,
            "untrusted.test": gateway,
            "slow.test": gateway,
            "flip.test": gateway,  # a test points it elsewhere and back
            "loop.test": "127.0.0.1",
            "meta.test": "169.254.169.254",
            "lan.test": "192.168.250.9",
            "nat64.test": "64:ff9b::7f00:1",
        }
        config = BundleConfig(
            allow=[Rule(host=h, ports=ports, cidrs=[subnet]) for h in ("upstream.test", "other.test", "untrusted.test",
                                                                       "slow.test", "flip.test")]
            + [Rule(host="pass.test", ports=ports, cidrs=[subnet], intercept=False)]
            + [Rule(host=h, ports=ports) for h in ("loop.test", "meta.test", "lan.test")]
            + [Rule(host="nat64.test", ports=ports, cidrs=[ip_network("fc00::/7")])]
            + [Rule(host="*.wild.test", ports=ports, cidrs=[subnet])],
            credentials=[Credential(host="upstream.test", header="x-api-key", template="{secret}", secret="c0")],
            refuse=[ip_network("192.168.38.0/24")],
            dns_port=free_port(udp=True),  # the bundle's own is 53; a test on loopback takes whatever is free
        )

        def resolver(host, port):
            if host == "slow.test":
                time.sleep(2)
            if host.endswith(".wild.test"):
                return [ip_address(gateway)]
            if host not in table:
                raise OSError("Name or service not known")
            return [ip_address(table[host])]

        with running_bundle(config, {"c0": SECRET}, workdir / CA_FILE, resolver, audit.append,
                            upstream_ca=tls_up["ca"]) as proxy_port:  # fmt: skip
            yield {"proxy": proxy_port, "tls": tls_up["port"], "plain": plain_up["port"], "audit": audit,
                   "table": table, "gateway": gateway, "tls_server": tls_up["server"], "plain_kept": plain_kept["port"],
                   "untrusted": untrusted_up["port"], "closed": closed, "client_ca": workdir / "bundle-ca.pem",
                   "upstream_ca": tls_up["ca_pair"], "upstream_ca_file": tls_up["ca"], "workdir": workdir,
                   "dns": config.dns_port}  # fmt: skip


def _closed_port(host: str) -> int:
    """A port on `host` that nothing listens on (bound and closed again)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


@pytest.mark.parametrize("split", [False, True])  # answered by the front door, or by mitmproxy
def test_a_tunnel_answered_by_either_side_gets_the_same_policy(world, split):
    port = world["tls"]
    for host, status, credentialed in [("upstream.test", 200, True), ("other.test", 200, False)]:
        before = len(world["audit"])
        with tunnel(world, host, port, split=split) as sock:
            got, body = exchange(sock, f"GET /echo?k=v HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
                                 .encode())  # fmt: skip
        assert got == status and (json.loads(body)["headers"].get("x-api-key") == SECRET) == credentialed
        assert [(e["method"], e["host"], e["decision"]) for e in world["audit"][before:]] == [
            ("CONNECT", host, "allow"), ("GET", host, "allow")]  # fmt: skip
    with tunnel(world, "pass.test", port, sni="other.test", split=split) as sock:
        got, body = exchange(sock, f"GET / HTTP/1.1\r\nHost: pass.test:{port}\r\nConnection: close\r\n\r\n".encode())
    assert got == 403 and b"does not name pass.test" in body


def test_the_credential_goes_to_its_host_and_no_other(world):
    status, body = https_get(world, "other.test")
    assert status == 200 and "x-api-key" not in {k.lower() for k in json.loads(body)["headers"]}
    status, body = http_get(world, "other.test")
    assert status == 200 and "x-api-key" not in {k.lower() for k in json.loads(body)["headers"]}


def test_plain_http_is_checked_but_never_carries_the_credential(world):
    status, body = http_get(world, "upstream.test")
    assert status == 200 and "x-api-key" not in {k.lower() for k in json.loads(body)["headers"]}


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
    assert status == 403 and b"Host names other.test but the request goes to upstream.test:" in body
    assert https_get(world, "upstream.test", host_header=f"upstream.test:{world['tls']}")[0] == 200


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


# -- as an attacker in the VM would try it ------------------------------------------------------------


def tunnel(world, host, port, *, sni=None, alpn=None, split=False):
    """A CONNECT through the bundle, then TLS inside it with `sni` (trusting the bundle's CA); the socket.

    With `split`, the CONNECT's head crosses two packets, so mitmproxy (not the front door) answers it.
    """
    raw = socket.create_connection(("127.0.0.1", world["proxy"]), timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    if split:
        raw.sendall(head[:9])
        time.sleep(0.05)
        head = head[9:]
    raw.sendall(head)
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += raw.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    if sni is False:
        return raw
    context = ssl.create_default_context(cafile=str(world["client_ca"]))
    if alpn:
        context.set_alpn_protocols(alpn)
    return context.wrap_socket(raw, server_hostname=sni or host)


def exchange(sock, request: bytes) -> tuple[int, bytes]:
    """Send one HTTP/1.1 request (which must ask to close), read the whole reply."""
    sock.sendall(request)
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def last_entry(world, **match):
    return [e for e in world["audit"] if all(e.get(k) == v for k, v in match.items())][-1]


def audit_since(world, before: int, count: int, settle: float = 0.0) -> list[dict]:
    """The audit lines after the first `before`, once there are `count` of them (or 5 s passed), and `settle`
    seconds more, so a line too many would show too."""
    deadline = time.monotonic() + 5
    while len(world["audit"]) < before + count and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(settle)
    return world["audit"][before:]


def test_an_absolute_form_target_inside_a_tunnel_cannot_front_the_credential(world):
    port = world["tls"]
    with tunnel(world, "upstream.test", port) as sock:
        status, body = exchange(sock, f"GET https://other.test:{port}/echo HTTP/1.1\r\nHost: upstream.test:{port}\r\n"
                                      "Connection: close\r\n\r\n".encode())  # fmt: skip
    assert status == 403 and b"the request target names other.test" in body and SECRET.encode() not in body
    entry = last_entry(world, rule="destination mismatch")
    assert entry["decision"] == "deny" and entry["host"] == "upstream.test"


def test_http2_authority_and_host_must_name_the_tunnels_host(world):
    import h2.config  # h2 is a dependency of mitmproxy
    import h2.connection
    import h2.events

    def get(authority, host=None):
        with tunnel(world, "upstream.test", world["tls"], alpn=["h2"]) as sock:
            assert sock.selected_alpn_protocol() == "h2"
            config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)  # as an attacker
            conn = h2.connection.H2Connection(config)
            conn.initiate_connection()
            headers = [(":method", "GET"), (":scheme", "https"), (":authority", authority), (":path", "/echo")]
            conn.send_headers(1, headers + ([("host", host)] if host else []), end_stream=True)
            sock.sendall(conn.data_to_send())
            status, body = None, b""
            while True:
                data = sock.recv(65536)
                if not data:
                    return None, b""  # the bundle ended the connection without answering
                events = conn.receive_data(data)
                for event in events:
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, 1)
                    elif isinstance(event, h2.events.StreamEnded):
                        return status, body
                sock.sendall(conn.data_to_send())

    port = world["tls"]
    status, body = get(f"upstream.test:{port}")
    assert status == 200 and json.loads(body)["headers"]["x-api-key"] == SECRET
    status, body = get(f"other.test:{port}")
    assert status == 403 and b"the request target names other.test" in body and SECRET.encode() not in body
    before = len(world["audit"])
    # mitmproxy's HTTP/2 layer itself refuses a Host that contradicts :authority: the stream is reset
    # before any flow exists, so nothing goes upstream and there is nothing to log.
    assert get(f"upstream.test:{port}", "other.test") == (None, b"")
    assert not [e for e in world["audit"][before:] if e["decision"] == "allow" and e["method"] != "CONNECT"]


@pytest.mark.parametrize("tunnelled_to", ["upstream.test", "pass.test"])
def test_a_tls_server_name_other_than_the_tunnels_host_is_refused(world, tunnelled_to):
    # Intercepted, the upstream TLS would otherwise be opened with the agent's name; passed through, the
    # agent's name would reach whatever front end serves the allowed address.
    port = world["tls"]
    with tunnel(world, tunnelled_to, port, sni="other.test") as sock:
        status, body = exchange(sock, f"GET /echo HTTP/1.1\r\nHost: other.test:{port}\r\nConnection: close\r\n\r\n".encode())
    expected = b"names other.test" if tunnelled_to == "upstream.test" else b"does not name pass.test"
    assert status == 403 and expected in body and SECRET.encode() not in body


def test_a_passthrough_tunnel_with_its_own_name_reaches_the_upstream_untouched(world):
    context = ssl.create_default_context(cafile=str(world["client_ca"]))
    with pytest.raises(ssl.SSLCertVerificationError):  # the upstream's own certificate: not the bundle's CA
        context.wrap_socket(tunnel(world, "pass.test", world["tls"], sni=False), server_hostname="pass.test")


def test_the_credential_never_travels_in_cleartext(world):
    plain = world["plain"]
    for tunnelled in (True, False):
        if tunnelled:  # plain HTTP inside a CONNECT to the credential's host
            sock = tunnel(world, "upstream.test", plain, sni=False)
            request = f"GET /echo HTTP/1.1\r\nHost: upstream.test:{plain}\r\nConnection: close\r\n\r\n"
        else:  # an http:// URL through the proxy
            sock = socket.create_connection(("127.0.0.1", world["proxy"]), timeout=10)
            request = (f"GET http://upstream.test:{plain}/echo HTTP/1.1\r\nHost: upstream.test:{plain}\r\n"
                       "x-api-key: agent-guess\r\nConnection: close\r\n\r\n")  # fmt: skip
        with sock:
            status, body = exchange(sock, request.encode())
        assert status == 200, body
        received = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
        assert "x-api-key" not in received and SECRET not in json.dumps(received)


@pytest.mark.parametrize(("host", "port_key", "why"),
                         [("upstream.test", "closed", "connect call failed|connection refused"),  # asyncio|uvloop
                          ("untrusted.test", "untrusted", "certificate")])  # fmt: skip
def test_a_failed_request_gets_exactly_one_audit_line(world, host, port_key, why):
    before = len(world["audit"])
    with tunnel(world, host, world[port_key]) as sock:
        status, _ = exchange(sock, f"GET /x?token=sk-leak HTTP/1.1\r\nHost: {host}:{world[port_key]}\r\n"
                                   "Connection: close\r\n\r\n".encode())  # fmt: skip
    assert status == 502
    [connect, entry] = audit_since(world, before, 2)  # the tunnel, then the request in it
    assert (connect["method"], connect["decision"]) == ("CONNECT", "allow")
    assert (entry["decision"], entry["host"], entry["path"]) == ("error", host, "/x?token=REDACTED")
    assert re.search(why, entry["reason"].lower()) and "sk-leak" not in json.dumps(entry)


def test_an_ipv6_form_of_loopback_is_refused(world):
    reply = connect_status(world, "nat64.test", world["tls"])
    assert reply.startswith("HTTP/1.1 403") and "which carries 127.0.0.1" in reply


def keep_alive_tunnel(world, host):
    context = ssl.create_default_context(cafile=str(world["client_ca"]))
    conn = http.client.HTTPSConnection("127.0.0.1", world["proxy"], context=context, timeout=10)
    conn.set_tunnel(host, world["tls"])
    return conn


def keep_alive_get(conn, host, port, headers=None):
    """One request on a kept-alive tunnel: (status, the upstream's echo or the bundle's body)."""
    conn.request("GET", "/echo", headers={"Host": f"{host}:{port}", **(headers or {})})
    response = conn.getresponse()
    body = response.read()
    assert not response.will_close, "the bundle closed a kept-alive tunnel"
    return response.status, json.loads(body) if response.status == 200 else body


def test_keep_alive_requests_in_one_tunnel_share_one_upstream_connection(world):
    # More than mitmproxy's 5 connections to one address per client: with a connection per request and an
    # upstream that keeps them open, the sixth request waited for one to close.
    port, server, before = world["tls"], world["tls_server"], len(world["audit"])
    connections = server.connections
    conn = keep_alive_tunnel(world, "upstream.test")
    echoes = [keep_alive_get(conn, "upstream.test", port)[1] for _ in range(8)]
    conn.close()
    assert all(e["headers"]["x-api-key"] == SECRET for e in echoes)
    assert len({e["peer_port"] for e in echoes}) == 1 and server.connections == connections + 1
    lines = [(e["method"], e["host"], e["status"]) for e in world["audit"][before:] if e["host"] == "upstream.test"]
    assert lines == [("CONNECT", "upstream.test", 200)] + [("GET", "upstream.test", 200)] * 8  # one line a request


def test_a_reused_upstream_connection_carries_only_its_tunnels_host(world):
    """Two tunnels to names at one address and port: each its own upstream connection, with TLS verified
    for its own name; a request for the other name inside a tunnel is refused and logged, and the tunnel's
    next request still goes on its own connection."""
    port = world["tls"]
    with_key = keep_alive_tunnel(world, "upstream.test")
    without = keep_alive_tunnel(world, "other.test")
    try:
        first = keep_alive_get(with_key, "upstream.test", port)[1]
        other = keep_alive_get(without, "other.test", port, {"x-api-key": "agent-guess"})[1]
        before = len(world["audit"])
        status, body = keep_alive_get(with_key, "other.test", port)
        assert status == 403 and b"Host names other.test" in body and SECRET.encode() not in body
        assert [(e["decision"], e["host"], e["status"]) for e in world["audit"][before:]] == [
            ("deny", "upstream.test", 403)]  # fmt: skip
        again = keep_alive_get(with_key, "upstream.test", port)[1]
        other_again = keep_alive_get(without, "other.test", port)[1]
    finally:
        with_key.close()
        without.close()
    assert first["peer_port"] == again["peer_port"] != other["peer_port"] == other_again["peer_port"]
    assert again["headers"]["x-api-key"] == SECRET
    assert other["headers"]["x-api-key"] == "agent-guess" and "x-api-key" not in other_again["headers"]


def test_a_kept_alive_tunnel_whose_host_rebinds_inward_is_refused_not_sent_on_its_open_connection(world, monkeypatch):
    monkeypatch.setattr("bottle.bundle.addon.DECISION_TTL", 0)  # every request decides afresh
    port, server = world["tls"], world["tls_server"]
    conn = keep_alive_tunnel(world, "flip.test")
    try:
        first = keep_alive_get(conn, "flip.test", port)[1]
        world["table"]["flip.test"] = "127.0.0.1"
        before, served = len(world["audit"]), server.requests
        status, body = keep_alive_get(conn, "flip.test", port)
        assert status == 403 and b"resolves to 127.0.0.1" in body
        assert server.requests == served  # the open connection to the old address did not carry it
        [entry] = world["audit"][before:]
        assert (entry["decision"], entry["host"], entry["status"]) == ("deny", "flip.test", 403)
        world["table"]["flip.test"] = world["gateway"]
        again = keep_alive_get(conn, "flip.test", port)[1]
    finally:
        world["table"]["flip.test"] = world["gateway"]
        conn.close()
    assert again["peer_port"] == first["peer_port"]  # checked again, same address: the same connection


def test_requests_on_one_plain_client_connection_are_each_decided_and_logged(world):
    """A refusal keeps the agent's connection open for its next request, which is decided afresh; an
    allowed plain request's answer closes it (see the test below)."""
    conn = http.client.HTTPConnection("127.0.0.1", world["proxy"], timeout=10)
    answers = []
    for host in ("evil.test", "evil.test", "upstream.test"):
        before = len(world["audit"])
        conn.request("GET", f"http://{host}:{world['plain_kept']}/echo")
        response = conn.getresponse()
        body = response.read()
        [entry] = world["audit"][before:]
        answers.append((response.status, entry["host"], entry["decision"], response.will_close))
        assert SECRET.encode() not in body
    conn.close()
    assert answers == [(403, "evil.test", "deny", False), (403, "evil.test", "deny", False),
                       (200, "upstream.test", "allow", True)]  # fmt: skip


def test_a_slow_name_does_not_hold_up_other_requests(world):
    def timed(host):
        started = time.monotonic()
        status = http_get(world, host)[0]
        return status, time.monotonic() - started

    with ThreadPoolExecutor(9) as pool:
        slow = pool.submit(timed, "slow.test")
        time.sleep(0.2)  # the slow name is being resolved now
        fast = list(pool.map(timed, ["other.test"] * 8))
        slow_status, slow_seconds = slow.result()
    assert [s for s, _ in fast] == [200] * 8 and max(t for _, t in fast) < 1.0, fast
    assert slow_status == 200 and slow_seconds >= 2


@pytest.mark.parametrize("tls", [True, False])
def test_a_request_line_split_across_packets_still_meets_the_policy(world, tls):
    # mitmproxy would relay bytes it cannot yet call HTTP as raw TCP, past every check.
    port = world["tls"] if tls else world["plain"]
    sock = tunnel(world, "upstream.test", port, sni=None if tls else False)
    with sock:
        sock.sendall(b"GET /echo?token=sk-leak HTTP/1.1")
        time.sleep(0.3)
        status, body = exchange(sock, b"\r\nHost: other.test\r\nx-api-key: agent-guess\r\nConnection: close\r\n\r\n")
    assert status == 403 and b"Host names other.test" in body and b"agent-guess" not in body


def test_a_passthrough_tunnel_to_a_closed_port_gets_its_failure_logged(world):
    before = len(world["audit"])
    raw = tunnel(world, "pass.test", world["closed"], sni=False)
    context = ssl.create_default_context(cafile=str(world["client_ca"]))
    with pytest.raises((ssl.SSLError, OSError)):
        context.wrap_socket(raw, server_hostname="pass.test")
    deadline = time.monotonic() + 5
    while not [e for e in world["audit"][before:] if e["decision"] == "error"] and time.monotonic() < deadline:
        time.sleep(0.05)
    decisions = [(e["method"], e["decision"]) for e in world["audit"][before:]]
    assert decisions == [("CONNECT", "allow"), ("CONNECT", "error")]


# -- the front door: allowed passthrough tunnels are relayed outside mitmproxy (bottle.bundle.front) ----------


def passthrough_by_hand(world, request: bytes, *, host="pass.test", pipelined=False, piece=0) -> bytes:
    """A passthrough tunnel whose TLS the test drives by hand (ssl.MemoryBIO), to choose how the ClientHello
    travels: in the CONNECT's own packet (`pipelined`), or `piece` bytes a packet. The upstream's reply."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context(cafile=str(world["upstream_ca_file"]))
    tls = context.wrap_bio(incoming, outgoing, server_hostname=host)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    with socket.create_connection(("127.0.0.1", world["proxy"]), timeout=10) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connect = f"CONNECT {host}:{world['tls']} HTTP/1.1\r\nHost: {host}:{world['tls']}\r\n\r\n".encode()
        raw.sendall(connect + hello if pipelined else connect)
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += raw.recv(4096)
        head, _, rest = reply.partition(b"\r\n\r\n")
        assert head == b"HTTP/1.1 200 Connection established"
        if not pipelined:
            for at in range(0, len(hello), piece or len(hello)):
                raw.sendall(hello[at : at + (piece or len(hello))])
                time.sleep(0.005)
        incoming.write(rest)
        response, sent = b"", False
        while True:
            try:
                if not sent:
                    tls.do_handshake()
                    sent = tls.write(request) > 0
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                data = raw.recv(65536)
                if not data:
                    return response
                incoming.write(data)
                continue
            except ssl.SSLZeroReturnError:
                return response
            finally:
                raw.sendall(outgoing.read())
            if not chunk:
                return response
            response += chunk


@pytest.mark.parametrize(("pipelined", "piece"), [(True, 0), (False, 40), (False, 1)])
def test_a_passthrough_client_hello_is_read_however_it_arrives(world, pipelined, piece):
    before = len(world["audit"])
    request = b"GET /echo HTTP/1.1\r\nHost: pass.test\r\nx-api-key: agent-guess\r\nConnection: close\r\n\r\n"
    response = passthrough_by_hand(world, request, pipelined=pipelined, piece=piece)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["headers"]["x-api-key"] == "agent-guess"  # untouched
    [entry] = world["audit"][before:]  # the tunnel's one line
    assert (entry["method"], entry["host"], entry["decision"], entry["status"]) == ("CONNECT", "pass.test", "allow", 200)


def passthrough_tls(world) -> ssl.SSLSocket:
    """TLS to pass.test through a passthrough tunnel, verified against the upstream's own CA (not the bundle's)."""
    context = ssl.create_default_context(cafile=str(world["upstream_ca_file"]))
    return context.wrap_socket(tunnel(world, "pass.test", world["tls"], sni=False), server_hostname="pass.test")


def test_a_large_upload_crosses_a_passthrough_tunnel_whole(world):
    size = 8 * 1024 * 1024
    with passthrough_tls(world) as sock:
        sock.sendall(f"POST /echo HTTP/1.1\r\nHost: pass.test\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
                     .encode())  # fmt: skip
        sock.sendall(b"x" * size)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["body_bytes"] == size


def test_a_passthrough_tunnel_that_carries_nothing_is_closed_after_the_idle_timeout(world, monkeypatch, caplog):
    import bottle.bundle.front

    monkeypatch.setattr(bottle.bundle.front, "IDLE_TIMEOUT", 0.5)
    with passthrough_tls(world) as sock:
        start = time.monotonic()
        assert sock.recv(1) == b""  # closed by the bundle, not by the test's 10 s socket timeout
    assert time.monotonic() - start < 5
    time.sleep(0.2)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("sni", ["upstream.test", None])  # the front door's TLS, and mitmproxy's (no server name)
def test_an_intercepted_tunnel_outlives_the_front_doors_idle_timeout(world, monkeypatch, sni):
    """An agent may wait on a long answer (a model's stream) without a byte of its own: an intercepted tunnel's
    idleness is mitmproxy's to judge, which counts the upstream's traffic too, as it always did."""
    import bottle.bundle.front

    monkeypatch.setattr(bottle.bundle.front, "IDLE_TIMEOUT", 0.3)
    raw = tunnel(world, "upstream.test", world["tls"], sni=False)
    context = ssl.create_default_context(cafile=str(world["client_ca"]))
    context.check_hostname = sni is not None
    conn = http.client.HTTPConnection("upstream.test", world["tls"], timeout=10)
    conn.sock = context.wrap_socket(raw, server_hostname=sni)
    for _ in range(2):
        conn.request("GET", "/echo", headers={"Host": "upstream.test"})
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["path"] == "/echo"
        time.sleep(0.8)
    conn.close()


@pytest.mark.parametrize("sni", ["upstream.test", None])  # the front door's TLS, and mitmproxy's (no server name)
def test_an_agent_whose_tls_handshake_with_the_bundle_fails_gets_one_line_for_it(world, sni):
    """An agent that does not trust the bundle's CA leaves one error line after its CONNECT's, and nothing
    reaches the upstream."""
    before, served = len(world["audit"]), world["tls_server"].requests
    raw = tunnel(world, "upstream.test", world["tls"], sni=False)
    context = ssl.create_default_context(cafile=str(world["upstream_ca_file"]))  # not the bundle's CA
    context.check_hostname = sni is not None
    with pytest.raises(ssl.SSLCertVerificationError):
        context.wrap_socket(raw, server_hostname=sni)
    raw.close()
    lines = audit_since(world, before, 2, settle=0.3)
    assert [(e["method"], e["host"], e["port"], e["decision"]) for e in lines] == [
        ("CONNECT", "upstream.test", world["tls"], "allow"), ("TLS", "upstream.test", world["tls"], "error")
    ]
    assert lines[1]["reason"].startswith("the agent's TLS handshake with the bundle failed")
    assert world["tls_server"].requests == served


@pytest.mark.parametrize(("sni", "split"), [("upstream.test", False), (None, False), ("upstream.test", True)])
def test_an_agent_that_breaks_its_tls_is_closed_at_once_with_one_line_per_request(world, caplog, sni, split):
    """A record the bundle's TLS cannot decrypt, right after a request: the connection is closed and the request
    has its one line. Found by a red team on mitmproxy's TLS: it logged the error and read on, into a buffer the
    broken TLS never emptied, so an agent could fill the bundle's memory (and its log) as fast as it could send.
    The TLS is the front door's, mitmproxy's in a tunnel the front door answered (no server name), and in one
    mitmproxy answered (a split CONNECT)."""
    before = len(world["audit"])
    raw = tunnel(world, "upstream.test", world["tls"], sni=False, split=split)
    context = ssl.create_default_context(cafile=str(world["client_ca"]))
    context.check_hostname = sni is not None
    with context.wrap_socket(raw, server_hostname=sni) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: upstream.test\r\n\r\n")
        sent = 0
        with socket.socket(fileno=os.dup(sock.fileno())) as dup, pytest.raises(OSError):  # closed by the bundle
            dup.settimeout(5)
            while sent < 64 * 2**20:  # and on, never reading
                dup.sendall(b"\x17\x03\x03\x40\x00" + b"\x00" * 2**14)  # application data no key decrypts
                sent += 2**14 + 5
        assert sent < 16 * 2**20  # what the kernel's buffers took before the reset came back
    lines = audit_since(world, before, 2, settle=0.3)
    assert [e["method"] for e in lines] == ["CONNECT", "GET"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("how", ["plain", "front door TLS", "mitmproxy TLS"])
def test_a_request_head_that_never_ends_is_refused_with_431_and_a_line(world, how):
    """Found on mitmproxy: it reads a request head until its blank line, however long, so one header that
    never ended grew the bundle's memory as fast as the agent could send (300 MiB for 300 MiB)."""
    from bottle.bundle.front import HEAD_LIMIT

    before = len(world["audit"])
    if how == "plain":
        sock = socket.create_connection(("127.0.0.1", world["proxy"]), timeout=10)
        sock.sendall(f"GET http://upstream.test:{world['plain']}/echo HTTP/1.1\r\n".encode())
    else:
        raw = tunnel(world, "upstream.test", world["tls"], sni=False)
        context = ssl.create_default_context(cafile=str(world["client_ca"]))
        context.check_hostname = how == "front door TLS"
        sock = context.wrap_socket(raw, server_hostname="upstream.test" if how == "front door TLS" else None)
        sock.sendall(b"GET /echo HTTP/1.1\r\n")
    sent, answer = 0, b""
    with sock:
        try:
            while sent < 64 * 2**20:
                sock.sendall(b"X-Long: " + b"a" * 4096 + b"\r\n")
                sent += 4106
        except OSError:
            pass  # closed by the bundle
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    assert sent < 16 * 2**20 and answer.startswith(b"HTTP/1.1 431 ")
    assert f"a request head over {HEAD_LIMIT} bytes".encode() in answer
    line = audit_since(world, before, 1 if how == "plain" else 2, settle=0.2)[-1]
    assert (line["method"], line["decision"], line["rule"], line["status"]) == ("HTTP", "deny", "head too large", 431)
    assert line["host"] == (None if how == "plain" else "upstream.test")


@pytest.mark.parametrize("what", ["chunk line", "while waiting"])
def test_whatever_the_http_layer_holds_unparsed_is_bounded_and_the_request_has_its_line(world, what):
    """Found by a red team: mitmproxy also held without end a chunk-size line that never ended, and whatever
    the agent sent while its answer was awaited. The connection is closed; the request has its error line."""
    before = len(world["audit"])
    with socket.socket() as silent:  # an upstream that takes the connection and never answers
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        silent.bind((world["gateway"], world["closed"]))
        silent.listen()
        port = world["plain"] if what == "chunk line" else world["closed"]
        with socket.create_connection(("127.0.0.1", world["proxy"]), timeout=10) as sock:
            if what == "chunk line":
                sock.sendall(f"POST http://upstream.test:{port}/echo HTTP/1.1\r\nHost: upstream.test:{port}\r\n"
                             "Transfer-Encoding: chunked\r\n\r\n1;x=".encode())  # fmt: skip
            else:
                sock.sendall(f"GET http://upstream.test:{port}/ HTTP/1.1\r\nHost: upstream.test:{port}\r\n\r\n"
                             .encode())  # fmt: skip
                time.sleep(0.3)
            sent = 0
            with pytest.raises(OSError):  # closed by the bundle
                while sent < 64 * 2**20:
                    sock.sendall(b"a" * 2**16)
                    sent += 2**16
            assert sent < 16 * 2**20  # what the kernel's buffers took before the reset came back
        lines = audit_since(world, before, 1, settle=0.3)
    assert [(e["method"], e["decision"]) for e in lines] == [("POST" if what == "chunk line" else "GET", "error")]


def _tls12_record_forger(world, keylog):
    """An intercepted tunnel to upstream.test whose TLS 1.2 the test completes by hand, and a function that makes
    the agent's next encrypted record of a given type from plaintext (keys from the client's key log): the
    records an agent with its own TLS stack can send and Python's ssl module never would."""
    import hashlib
    import hmac

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    raw = tunnel(world, "upstream.test", world["tls"], sni=False)
    context = ssl.create_default_context(cafile=str(world["client_ca"]))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")  # the bottle CA's key is P-256
    context.keylog_filename = str(keylog)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="upstream.test")
    first = b""
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            raw.sendall(outgoing.read())
            data = raw.recv(65536)
            first = first or data
            incoming.write(data)
    raw.sendall(outgoing.read())
    server_random = first[11:43]  # record header, handshake header, version: then the ServerHello's random
    _, client_random, master = keylog.read_text().split("\n")[-2].split()
    secret, seed = bytes.fromhex(master), b"key expansion" + server_random + bytes.fromhex(client_random)
    block, a = b"", seed
    while len(block) < 40:  # the TLS 1.2 PRF (SHA-256): client key, server key, client IV, server IV
        a = hmac.new(secret, a, hashlib.sha256).digest()
        block += hmac.new(secret, a + seed, hashlib.sha256).digest()
    aead, iv, sequence = AESGCM(block[:16]), block[32:36], [1]  # the client's Finished was record 0

    def record(kind: int, plain: bytes) -> bytes:
        nonce = struct.pack(">Q", sequence[0])
        sequence[0] += 1
        sealed = aead.encrypt(iv + nonce, plain, nonce + bytes([kind]) + b"\x03\x03" + struct.pack(">H", len(plain)))
        return bytes([kind]) + b"\x03\x03" + struct.pack(">H", 8 + len(sealed)) + nonce + sealed

    return raw, record


def test_an_agent_that_never_reads_stalls_itself_and_not_the_bundles_memory(world, tmp_path):
    """Found by a red team: records that make the bundle's TLS answer but carry no plaintext (here renegotiation
    requests, each refused with an alert) were answered without waiting for the agent to read the answers, so an
    agent that never read grew the bundle's memory as fast as it could send."""
    raw, record = _tls12_record_forger(world, tmp_path / "keys")
    raw.sendall(record(23, b"GET /echo HTTP/1.1\r\nHost: upstream.test\r\n\r\n"))
    raw.settimeout(5)
    assert raw.recv(65536)[:1] == b"\x17"  # answered, so the keys are right
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and from now on it never reads
    raw.settimeout(2)
    sent = 0
    try:
        while sent < 24 * 2**20:  # it stalls after 8 to 10 MiB of kernel buffers here
            batch = b"".join(record(22, b"\x01\x00\x00\x00") for _ in range(2000))  # an empty ClientHello each
            raw.sendall(batch)
            sent += len(batch)
    except socket.timeout:
        pass
    held = [agent._writer.transport.get_write_buffer_size() for agent in gc.get_objects()
            if isinstance(agent, AgentTLS) and not agent._writer.is_closing()]  # fmt: skip
    raw.close()
    assert held and max(held) < 2**20, f"the bundle holds {max(held) / 2**20:.0f} MiB after {sent / 2**20:.0f} MiB"


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_an_agent_that_resets_its_tunnels_leaves_whole_audit_lines_and_no_traceback(world, caplog):
    """Found by a red team: uvloop raises RuntimeError writing to a closed transport, which the relay let out."""
    before = len(world["audit"])
    relayed = passthrough_tls(world)
    time.sleep(0.2)
    _reset(relayed)  # mid-relay
    raw = socket.create_connection(("127.0.0.1", world["proxy"]), timeout=10)
    raw.sendall(b"CONNECT slow.test:%d HTTP/1.1\r\n\r\n" % world["tls"])
    time.sleep(0.5)
    _reset(raw)  # while its name resolves (2 s)
    assert [(e["method"], e["host"], e["decision"]) for e in audit_since(world, before, 2, settle=0.3)] == [
        ("CONNECT", "pass.test", "allow"), ("CONNECT", "slow.test", "allow")]  # fmt: skip
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]


def test_a_connection_reset_before_it_is_accepted_leaves_no_traceback_and_no_line(world, caplog):
    """Found by a red team: under uvloop such a connection has no peer address by the time it is handled,
    and mitmproxy's Block addon raised TypeError on it (and the log named a client "None")."""
    before = len(world["audit"])
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", world["proxy"]), timeout=10)
        sock.sendall(b"CONNECT pass.test:%d HTTP/1.1\r\n\r\n" % world["tls"])
        _reset(sock)
    time.sleep(0.5)
    assert not [e for e in world["audit"][before:] if e.get("client") == "None"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("split", [False, True])
def test_plain_http_in_a_passthrough_tunnel_to_a_failing_upstream_gets_one_line_per_request(world, split):
    """Found by a red team: the failed connect was logged for the tunnel and again for the request."""
    before = len(world["audit"])
    closed = world["closed"]
    with tunnel(world, "pass.test", closed, sni=False, split=split) as sock:
        status, _ = exchange(sock, f"GET /x?token=abc HTTP/1.1\r\nHost: pass.test:{closed}\r\nConnection: close\r\n\r\n"
                             .encode())  # fmt: skip
    assert status == 502
    time.sleep(0.3)
    assert [(e["method"], e["decision"]) for e in world["audit"][before:]] == [("CONNECT", "allow"), ("GET", "error")]


def test_the_agent_leaving_before_its_client_hello_still_leaves_one_audit_line(world):
    before = len(world["audit"])
    tunnel(world, "pass.test", world["tls"], sni=False).close()
    [entry] = audit_since(world, before, 1, settle=0.2)
    assert (entry["method"], entry["host"], entry["decision"]) == ("CONNECT", "pass.test", "allow")


def test_a_passthrough_host_that_rebinds_inward_before_its_client_hello_is_never_connected_to(world, monkeypatch):
    before = len(world["audit"])
    raw = tunnel(world, "pass.test", world["tls"], sni=False)
    monkeypatch.setitem(world["table"], "pass.test", "127.0.0.1")
    time.sleep(DECISION_TTL + 0.2)  # the decision the CONNECT got has run out: the connect decides anew
    context = ssl.create_default_context(cafile=str(world["upstream_ca_file"]))
    with pytest.raises((ssl.SSLError, OSError)):
        context.wrap_socket(raw, server_hostname="pass.test")
    raw.close()
    [granted, refused] = [e for e in world["audit"][before:] if e["host"] == "pass.test"]  # the tunnel, its connect
    assert (granted["decision"], refused["decision"]) == ("allow", "deny") and "127.0.0.1" in refused["reason"]


def test_plain_http_inside_a_passthrough_tunnel_meets_the_policy(world):
    plain = world["plain"]
    with tunnel(world, "pass.test", plain, sni=False) as sock:
        status, body = exchange(sock, f"GET /echo HTTP/1.1\r\nHost: other.test:{plain}\r\nConnection: close\r\n\r\n"
                                .encode())  # fmt: skip
    assert status == 403 and b"Host names other.test" in body
    with tunnel(world, "pass.test", plain, sni=False) as sock:
        status, body = exchange(sock, f"GET /echo HTTP/1.1\r\nHost: pass.test:{plain}\r\nConnection: close\r\n\r\n"
                                .encode())  # fmt: skip
    assert status == 200 and json.loads(body)["path"] == "/echo"


# -- DNS: the VM's resolver points at the bundle, which resolves nothing ----------------------------------


def dns_query(ident: int, name: str, qtype: int) -> bytes:
    """A stub resolver's query (RD set) with an EDNS OPT record, which the answer must not echo."""
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\x00"
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 1) + qname + struct.pack("!HH", qtype, 1) + opt


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_every_dns_query_is_refused_and_logged_with_its_name(world, transport):
    name = f"c2VjcmV0.{transport}.exfil.test"  # data a name could carry out, were it ever resolved
    message = dns_query(0x4242, name, 16)
    if transport == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(message, ("127.0.0.1", world["dns"]))
            reply = sock.recv(4096)
    else:
        with socket.create_connection(("127.0.0.1", world["dns"]), timeout=5) as sock:
            sock.sendall(struct.pack("!H", len(message)) + message)
            reply = b""
            while len(reply) < 2 or len(reply) < 2 + struct.unpack("!H", reply[:2])[0]:
                reply += sock.recv(4096) or pytest.fail("the bundle closed the connection without an answer")
            reply = reply[2:]
    ident, flags, *counts = struct.unpack("!HHHHHH", reply[:12])
    assert (ident, flags & 0x8000, flags & 0xF, counts) == (0x4242, 0x8000, 5, [1, 0, 0, 0])  # QR, REFUSED, no records
    entry = last_entry(world, event="dns", name=name.lower())  # the log keeps names lowercased
    assert (entry["decision"], entry["qtype"], entry["client"]) == ("refused", 16, "127.0.0.1") and "time" in entry


def test_a_body_over_the_size_limit_is_refused_before_it_is_read(world):
    plain = world["plain"]
    with socket.create_connection(("127.0.0.1", world["proxy"]), timeout=10) as sock:
        status, _ = exchange(sock, f"POST http://upstream.test:{plain}/echo HTTP/1.1\r\nHost: upstream.test:{plain}\r\n"
                                   "Content-Length: 200000000\r\nConnection: close\r\n\r\n".encode())  # fmt: skip
    assert status == 413


def test_an_h2c_upgrade_is_stripped_before_the_upstream(world):
    plain = world["plain"]
    with socket.create_connection(("127.0.0.1", world["proxy"]), timeout=10) as sock:
        status, body = exchange(sock, f"GET http://upstream.test:{plain}/echo HTTP/1.1\r\n"
                                      f"Host: upstream.test:{plain}\r\nUpgrade: h2c\r\n"
                                      "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
                                      "Connection: close\r\n\r\n".encode())  # fmt: skip
    assert status == 200
    assert not {"upgrade", "http2-settings"} & {k.lower() for k in json.loads(body)["headers"]}


class H2Tunnel:
    """An HTTP/2 connection through a tunnel, kept open for one request after another."""

    def __init__(self, world, host, port):
        import h2.config  # h2 is a dependency of mitmproxy
        import h2.connection

        self.sock = tunnel(world, host, port, alpn=["h2"])
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.authority = f"{host}:{port}"

    def get(self) -> int:
        import h2.events

        stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream, [(":method", "GET"), (":scheme", "https"), (":authority", self.authority),
                                        (":path", "/echo")], end_stream=True)  # fmt: skip
        self.sock.sendall(self.conn.data_to_send())
        status = None
        while True:
            for event in self.conn.receive_data(self.sock.recv(65536)):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    return status
            self.sock.sendall(self.conn.data_to_send())


def test_a_failed_upstream_connect_does_not_stick_to_a_kept_alive_http2_tunnel(world, monkeypatch):
    """Found by a red team of upstream connection reuse: mitmproxy answered every later request for the
    failed connection's address with its error, for as long as the client kept its HTTP/2 connection."""
    monkeypatch.setattr("bottle.bundle.addon.DECISION_TTL", 0)
    client = H2Tunnel(world, "flip.test", world["closed"])  # to the port where nothing listens, yet
    try:
        assert client.get() == 502
        before = len(world["audit"])
        with echo_server(world["gateway"], tls_names=["flip.test"], workdir=world["workdir"], keep_alive=True,
                         port=world["closed"], ca=world["upstream_ca"]) as came_back:  # fmt: skip
            assert client.get() == 200 and came_back["server"].requests == 1
        assert [(e["host"], e["status"]) for e in world["audit"][before:]] == [("flip.test", 200)]
    finally:
        client.sock.close()


def test_a_failed_upstream_tls_handshake_does_not_stick_to_a_kept_alive_http2_tunnel(world, monkeypatch):
    """As above, for an upstream whose TLS fails (found by a red team of that fix): each request connects,
    and is checked, anew."""
    from bottle.bundle.addon import BottlePolicy

    connects, real_connect = [], BottlePolicy.server_connect

    async def counted(self, data):
        connects.append(data.server.address)
        await real_connect(self, data)

    monkeypatch.setattr(BottlePolicy, "server_connect", counted)
    before = len(world["audit"])
    client = H2Tunnel(world, "untrusted.test", world["untrusted"])
    try:
        assert [client.get() for _ in range(3)] == [502] * 3
    finally:
        client.sock.close()
    assert len(connects) == 3  # one connect, and one decision, for each request
    assert [(e["host"], e["decision"]) for e in world["audit"][before:]] == [("untrusted.test", "allow")] + [
        ("untrusted.test", "error")] * 3  # fmt: skip


def test_plain_requests_to_a_server_that_keeps_connections_open_never_pile_up(world):
    """mitmproxy holds at most five upstream connections to one address per client, and a plain proxy
    request's connection is never reused: the sixth request to a kept-alive server used to hang, unlogged."""
    port, before = world["plain_kept"], len(world["audit"])
    conn = http.client.HTTPConnection("127.0.0.1", world["proxy"], timeout=5)  # reconnects when told to close
    statuses = []
    try:
        for host in ["upstream.test", "other.test"] * 4:
            conn.request("GET", f"http://{host}:{port}/echo", headers={"Host": f"{host}:{port}"})
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        conn.close()
    assert statuses == [200] * 8
    assert [(e["host"], e["status"]) for e in world["audit"][before:]] == [("upstream.test", 200), ("other.test", 200)] * 4
