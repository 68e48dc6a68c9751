"""The mitmproxy addon's hooks, driven with mitmproxy's own test flows: no sockets, no DNS."""

import asyncio
import time
from ipaddress import ip_address, ip_network

import pytest
from mitmproxy.proxy import server_hooks
from mitmproxy.test import tflow, tutils

from bottle.bundle.addon import BottlePolicy
from bottle.bundle.policy import BundleConfig, Credential, Policy, Rule

TABLE = {"api.example.com": "93.184.216.34", "other.example.com": "93.184.216.35", "rebind.example.com": "127.0.0.1",
         "slow.example.com": "93.184.216.36"}  # fmt: skip


def table(host, port):
    if host == "slow.example.com":
        time.sleep(1)
    return [ip_address(TABLE[host])]


@pytest.fixture
def addon():
    config = BundleConfig(
        allow=[Rule(host="api.example.com"), Rule(host="other.example.com", intercept=False),
               Rule(host="rebind.example.com"), Rule(host="slow.example.com")],
        credentials=[Credential(host="api.example.com", header="x-api-key", template="Key {secret}", secret="c0")],
        refuse=[ip_network("192.168.38.0/24")],
    )  # fmt: skip
    log: list[dict] = []
    addon = BottlePolicy(Policy(config, table), {"c0": "s3cret"}, log.append, dns_timeout=0.3)
    addon.log = log
    return addon


def run(coroutine):
    return asyncio.run(coroutine)


def flow(host, port=443, method="GET", path="/v1/messages?key=abc", host_header=None, client=None):
    request = tutils.treq(host=host, port=port, method=method.encode(), path=path.encode(), scheme=b"https")
    request.headers["host"] = host_header or host
    f = tflow.tflow(req=request)
    if client is not None:
        f.client_conn = client
    return f


def tunnel(addon, host, *, sni=None, upstream_sni=None):
    """A CONNECT to host:443 that the addon accepted, then an intercepted request inside it."""
    connect = flow(host, method="CONNECT", path="")
    connect.client_conn.tls, connect.client_conn.sni = False, None
    run(addon.http_connect(connect))
    assert connect.response is None
    inner = flow(host, client=connect.client_conn)
    inner.client_conn.tls, inner.client_conn.sni = True, sni or host
    inner.server_conn.tls, inner.server_conn.sni = True, upstream_sni or host
    return inner


def test_connect_to_a_host_off_the_allowlist_gets_a_403_naming_it(addon):
    f = flow("evil.example.net", method="CONNECT", path="")
    run(addon.http_connect(f))
    assert f.response.status_code == 403
    assert f.response.text == "bottle: refused: evil.example.net is not on this bottle's egress allowlist (rule: no rule)\n"
    assert addon.log[-1] | {"time": None} == {
        "time": None, "decision": "deny", "rule": "no rule", "reason": "evil.example.net is not on this bottle's "
        "egress allowlist", "method": "CONNECT", "host": "evil.example.net", "port": 443, "path": "", "status": 403,
        "bytes_out": 0, "bytes_in": 0,
    }  # fmt: skip


def test_connect_to_an_allowed_host_passes_without_a_response_and_gets_its_own_line(addon):
    f = flow("api.example.com", method="CONNECT", path="")
    run(addon.http_connect(f))
    assert f.response is None
    [entry] = addon.log  # the tunnel; each request inside it gets a line of its own
    assert (entry["method"], entry["host"], entry["decision"], entry["status"]) == ("CONNECT", "api.example.com",
                                                                                      "allow", 200)  # fmt: skip


def test_a_request_in_a_verified_tunnel_gets_its_hosts_credential_replacing_the_agents(addon):
    f = tunnel(addon, "api.example.com")
    f.request.headers["x-api-key"] = "agent-made-this-up"
    run(addon.request(f))
    assert f.response is None and f.request.headers["x-api-key"] == "Key s3cret"
    f.response = tutils.tresp(content=b"12345")
    addon.response(f)
    entry = addon.log[-1]
    assert (entry["decision"], entry["status"], entry["bytes_in"]) == ("allow", 200, 5)
    assert entry["path"] == "/v1/messages?key=REDACTED"
    assert "s3cret" not in repr(addon.log)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda f: setattr(f.request, "scheme", "http"),  # plain HTTP inside the CONNECT
        lambda f: setattr(f.client_conn, "tls", False),
        lambda f: setattr(f.server_conn, "tls", False),
        lambda f: setattr(f.server_conn, "sni", "other.example.com"),  # upstream verified for another name
        lambda f: setattr(f.server_conn, "sni", "93.184.216.34"),  # or for the address alone
    ],
)
def test_no_credential_without_tls_the_bundle_verified_for_the_credentials_host(addon, tamper):
    f = tunnel(addon, "api.example.com")
    f.request.headers["x-api-key"] = "agent-guess"
    tamper(f)
    run(addon.request(f))
    assert "x-api-key" not in f.request.headers


def test_a_plain_proxy_request_never_carries_the_credential(addon):
    f = flow("api.example.com", port=80)
    run(addon.request(f))
    assert f.response is None and "x-api-key" not in f.request.headers


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        (lambda f: f.request.headers.__setitem__("host", "other.example.com"), "Host names other.example.com"),
        (lambda f: setattr(f.request, "authority", "other.example.com:443"), "the request target names other"),
        (lambda f: setattr(f.client_conn, "sni", "other.example.com"), "the TLS server name names other"),
        (lambda f: f.request.headers.__setitem__("host", "api.example.com:8443"), "names api.example.com:8443"),
        (lambda f: f.request.headers.add("host", "other.example.com"), "Host names other.example.com"),
        (lambda f: setattr(f.request, "path", "https://other.example.com/x"), "not a path on its host"),
    ],
)
def test_every_name_a_request_carries_must_be_its_tunnels_host(addon, tamper, named):
    f = tunnel(addon, "api.example.com")
    tamper(f)
    run(addon.request(f))
    assert f.response.status_code == 403 and "x-api-key" not in f.request.headers
    assert named in f.response.text
    assert addon.log[-1]["decision"] == "deny" and addon.log[-1]["rule"] == "destination mismatch"
    assert addon.log[-1]["host"] == "api.example.com"


def test_a_plain_request_naming_another_host_than_its_target_is_refused(addon):
    f = flow("api.example.com", port=80, host_header="other.example.com")
    run(addon.request(f))
    assert f.response.status_code == 403
    assert "Host names other.example.com but the request goes to api.example.com:80" in f.response.text


def test_an_allowed_name_that_rebinds_to_loopback_is_refused_at_request_and_connect(addon, monkeypatch):
    f = flow("rebind.example.com")
    run(addon.request(f))
    assert f.response.status_code == 403 and "resolves to 127.0.0.1" in f.response.text
    monkeypatch.setattr("bottle.bundle.addon.DECISION_TTL", 0)
    data = server_hooks.ServerConnectionHookData(server=tflow.tserver_conn(), client=tflow.tclient_conn())
    data.server.address = ("rebind.example.com", 443)
    run(addon.server_connect(data))
    assert data.server.error.startswith("bottle: refused: rebind.example.com resolves to 127.0.0.1")


def test_server_connections_are_pinned_to_the_checked_address_and_reconnects_keep_the_tunnels_host(addon):
    inner = tunnel(addon, "api.example.com")
    data = server_hooks.ServerConnectionHookData(server=tflow.tserver_conn(), client=inner.client_conn)
    data.server.address = ("api.example.com", 443)
    run(addon.server_connect(data))
    assert data.server.address == ("93.184.216.34", 443) and data.server.error is None
    run(addon.server_connect(data))  # a reconnect: the address is an IP by now, the tunnel still names the host
    assert data.server.address == ("93.184.216.34", 443) and data.server.error is None


def test_requests_in_a_tunnel_go_by_the_checked_address_so_only_a_connection_there_is_reused(addon, monkeypatch):
    # mitmproxy reuses an upstream connection of the client's only for a request whose host and port are
    # that connection's address: the address server_connect pinned and checked.
    f = tunnel(addon, "api.example.com")
    run(addon.request(f))
    assert f.response is None and f.request.host == "93.184.216.34" and f.request.headers["host"] == "api.example.com"
    monkeypatch.setattr("bottle.bundle.addon.DECISION_TTL", 0)
    monkeypatch.setitem(TABLE, "api.example.com", "93.184.216.99")  # the name moved: a new connection, checked
    again = flow("api.example.com", client=f.client_conn)
    again.server_conn.tls, again.server_conn.sni = True, "api.example.com"
    run(addon.request(again))
    assert again.response is None and again.request.host == "93.184.216.99"
    monkeypatch.setitem(TABLE, "api.example.com", "127.0.0.1")  # or rebound inward: refused, not sent anywhere
    inward = flow("api.example.com", client=f.client_conn)
    run(addon.request(inward))
    assert inward.response.status_code == 403 and addon.log[-1]["decision"] == "deny"


def test_a_plain_proxy_request_keeps_its_host_so_no_connection_is_shared_between_hosts(addon):
    f = flow("api.example.com", port=80)
    run(addon.request(f))
    assert f.response is None and f.request.host == "api.example.com"


def test_a_tunnels_upstream_tls_names_the_tunnels_host_whatever_name_mitmproxy_offered(addon):
    inner = tunnel(addon, "api.example.com")
    server = tflow.tserver_conn()
    server.address, server.sni = ("93.184.216.34", 443), "93.184.216.34"  # a request routed by its address
    run(addon.server_connect(server_hooks.ServerConnectionHookData(server=server, client=inner.client_conn)))
    assert server.address == ("93.184.216.34", 443) and server.sni == "api.example.com" and server.error is None
    plain = tflow.tserver_conn()
    plain.address, plain.sni = ("api.example.com", 443), "api.example.com"
    run(addon.server_connect(server_hooks.ServerConnectionHookData(server=plain, client=tflow.tclient_conn())))
    assert plain.address == ("93.184.216.34", 443) and plain.sni == "api.example.com"


def test_a_slow_name_is_refused_after_the_timeout_without_blocking_the_loop(addon):
    async def both():
        slow = asyncio.ensure_future(addon.decide("slow.example.com", 443))
        started = time.monotonic()
        fast = await addon.decide("api.example.com", 443)
        return fast, time.monotonic() - started, await slow

    fast, waited, slow = run(both())
    assert fast.allowed and waited < 0.2
    assert not slow.allowed and "did not resolve within 0.3 s" in slow.reason


def test_an_error_gets_exactly_one_audit_line(addon):
    f = tunnel(addon, "api.example.com")
    run(addon.request(f))
    f.error = tflow.terr("connection refused")
    addon.error(f)
    addon.error(f)
    [connect, entry] = addon.log
    assert connect["method"] == "CONNECT"
    assert (entry["decision"], entry["reason"], entry["host"]) == ("error", "connection refused", "api.example.com")


class Hello:
    def __init__(self, client, sni):
        self.context = type("Context", (), {"server": tflow.tserver_conn(), "client": client})()
        self.client_hello = type("ClientHello", (), {"sni": sni})()
        self.ignore_connection = False


@pytest.mark.parametrize(
    ("host", "sni", "ignored", "upstream_sni"),
    [
        ("other.example.com", "other.example.com", True, None),  # passthrough to the name it tunnelled to
        ("other.example.com", "evil.example.net", False, "other.example.com"),  # another name: intercepted, refused
        ("other.example.com", None, False, "other.example.com"),  # no server name: intercepted, refused
        ("api.example.com", "evil.example.net", False, "api.example.com"),  # upstream TLS names the tunnel's host
    ],
)
def test_the_tls_server_name_decides_passthrough_and_never_the_upstream_name(addon, host, sni, ignored, upstream_sni):
    connect = flow(host, method="CONNECT", path="")
    run(addon.http_connect(connect))
    hello = Hello(connect.client_conn, sni)
    addon.tls_clienthello(hello)
    assert hello.ignore_connection is ignored
    assert hello.context.server.sni == (upstream_sni or hello.context.server.sni)


@pytest.mark.parametrize("sni", ["evil.example.net", None])
def test_a_passthrough_tunnel_with_another_or_no_server_name_is_refused_and_never_credentialed(addon, sni):
    addon.policy.config.credentials.append(
        Credential(host="other.example.com", header="x-pass-key", secret="c0")
    )  # a bundle config that (unlike a manifest) names a credential for a passthrough host
    connect = flow("other.example.com", method="CONNECT", path="")
    run(addon.http_connect(connect))
    addon.tls_clienthello(Hello(connect.client_conn, sni))
    inner = flow("other.example.com", client=connect.client_conn)
    inner.client_conn.tls, inner.client_conn.sni = True, sni
    inner.server_conn.tls, inner.server_conn.sni = True, "other.example.com"
    run(addon.request(inner))
    assert inner.response.status_code == 403 and "x-pass-key" not in inner.request.headers
    assert "the TLS server name does not name other.example.com" in inner.response.text


def test_concurrent_lookups_of_one_slow_name_take_one_resolver_thread_whatever_the_port(addon, monkeypatch):
    calls = []
    real = addon.policy.lookup
    monkeypatch.setattr(addon.policy, "lookup", lambda host, port: calls.append(host) or real(host, port))

    async def many():
        slow = [asyncio.ensure_future(addon.decide("slow.example.com", port)) for port in [443, 80] * 20]
        fast = await addon.decide("api.example.com", 443)
        return fast, await asyncio.gather(*slow)

    fast, slow = run(many())
    assert fast.allowed and calls.count("slow.example.com") == 1


@pytest.mark.parametrize("port", [53, 5353])
def test_dns_ports_are_never_tunnelled(addon, port):
    addon.policy.config.allow[0].ports.append(port)  # even where a rule lists them
    f = flow("api.example.com", port=port, method="CONNECT", path="")
    run(addon.http_connect(f))
    assert f.response.status_code == 403 and f"port {port} is DNS" in f.response.text


def test_error_reasons_keep_no_secret_and_no_quoted_bytes(addon):
    f = tunnel(addon, "api.example.com")
    run(addon.request(f))
    f.error = tflow.terr("Cannot parse HTTP response: Invalid header line: b'X-Reflect Key s3cret'")
    addon.error(f)
    reason = addon.log[-1]["reason"]
    assert "s3cret" not in reason and reason == "Cannot parse HTTP response: Invalid header line: (data withheld)"
    assert addon._safe("Cannot parse ClientHello: 160301000568656c6c6f3f746f6b656e3d") == (
        "Cannot parse ClientHello: (data withheld)"
    )
    assert addon._safe("leaked s3cret here") == "leaked REDACTED here"
