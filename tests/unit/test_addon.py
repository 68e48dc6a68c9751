"""The mitmproxy addon's hooks, driven with mitmproxy's own test flows: no sockets, no DNS."""

from ipaddress import ip_address, ip_network

import pytest
from mitmproxy.proxy import server_hooks
from mitmproxy.test import tflow, tutils

from bottle.bundle.addon import BottlePolicy
from bottle.bundle.policy import BundleConfig, Credential, Policy, Rule

TABLE = {"api.example.com": "93.184.216.34", "other.example.com": "93.184.216.35", "rebind.example.com": "127.0.0.1"}


@pytest.fixture
def addon():
    config = BundleConfig(
        allow=[Rule(host="api.example.com"), Rule(host="other.example.com", intercept=False),
               Rule(host="rebind.example.com")],
        credentials=[Credential(host="api.example.com", header="x-api-key", template="Key {secret}", secret="c0")],
        refuse=[ip_network("192.168.38.0/24")],
    )  # fmt: skip
    log: list[dict] = []
    addon = BottlePolicy(Policy(config, lambda host, port: [ip_address(TABLE[host])]), {"c0": "s3cret"}, log.append)
    addon.log = log
    return addon


def flow(host, port=443, method="GET", path="/v1/messages?key=abc", host_header=None):
    request = tutils.treq(host=host, port=port, method=method.encode(), path=path.encode(), scheme=b"https")
    request.headers["host"] = host_header or host
    return tflow.tflow(req=request)


def test_connect_to_a_host_off_the_allowlist_gets_a_403_naming_it(addon):
    f = flow("evil.example.net", method="CONNECT", path="")
    addon.http_connect(f)
    assert f.response.status_code == 403
    assert f.response.text == "bottle: refused: evil.example.net is not on this bottle's egress allowlist (rule: no rule)\n"
    assert addon.log[-1] | {"time": None} == {
        "time": None, "decision": "deny", "rule": "no rule", "reason": "evil.example.net is not on this bottle's "
        "egress allowlist", "method": "CONNECT", "host": "evil.example.net", "port": 443, "path": "", "status": 403,
        "bytes_out": 0, "bytes_in": 0,
    }  # fmt: skip


def test_connect_to_an_allowed_host_passes_without_a_response(addon):
    f = flow("api.example.com", method="CONNECT", path="")
    addon.http_connect(f)
    assert f.response is None and addon.log == []  # logged per request, once intercepted


def test_a_request_gets_its_hosts_credential_replacing_the_agents(addon):
    f = flow("api.example.com")
    f.request.headers["x-api-key"] = "agent-made-this-up"
    addon.request(f)
    assert f.response is None and f.request.headers["x-api-key"] == "Key s3cret"
    f.response = tutils.tresp(content=b"12345")
    addon.response(f)
    entry = addon.log[-1]
    assert (entry["decision"], entry["status"], entry["bytes_in"]) == ("allow", 200, 5)
    assert entry["path"] == "/v1/messages?key=REDACTED"
    assert "s3cret" not in repr(addon.log)


def test_other_hosts_get_no_credential(addon):
    f = flow("other.example.com")
    addon.request(f)
    assert "x-api-key" not in f.request.headers


def test_a_request_naming_another_host_than_its_connection_is_refused(addon):
    f = flow("api.example.com", host_header="other.example.com")
    addon.request(f)
    assert f.response.status_code == 403 and "x-api-key" not in f.request.headers
    assert "names other.example.com but its connection is to api.example.com" in f.response.text


def test_an_allowed_name_that_rebinds_to_loopback_is_refused_at_request_and_connect(addon):
    f = flow("rebind.example.com")
    addon.request(f)
    assert f.response.status_code == 403 and "resolves to 127.0.0.1" in f.response.text
    data = server_hooks.ServerConnectionHookData(server=tflow.tserver_conn(), client=tflow.tclient_conn())
    data.server.address = ("rebind.example.com", 443)
    addon.server_connect(data)
    assert data.server.error.startswith("bottle: refused: rebind.example.com resolves to 127.0.0.1")


def test_server_connections_are_pinned_to_the_checked_address(addon):
    data = server_hooks.ServerConnectionHookData(server=tflow.tserver_conn(), client=tflow.tclient_conn())
    data.server.address = ("api.example.com", 443)
    addon.server_connect(data)
    assert data.server.address == ("93.184.216.34", 443) and data.server.error is None


def test_a_rule_without_interception_tunnels_tls_untouched(addon):
    class Hello:
        context = type("Context", (), {"server": tflow.tserver_conn()})()
        ignore_connection = False

    for host, ignored in [("other.example.com", True), ("api.example.com", False)]:
        hello = Hello()
        hello.context.server.address = (host, 443)
        addon.tls_clienthello(hello)
        assert hello.ignore_connection is ignored
