import json
from ipaddress import ip_address, ip_network

import pytest

from bottle.bundle.policy import BundleConfig, Policy, Rule, redact_path

PUBLIC = ip_address("93.184.216.34")


def policy(rules, dns=None, refuse=("192.168.38.0/24",), credentials=()):
    config = BundleConfig(allow=rules, refuse=[ip_network(n) for n in refuse], credentials=list(credentials))
    table = {"api.example.com": [PUBLIC], "a.b.example.org": [PUBLIC], "example.org": [PUBLIC]} | (dns or {})

    def resolver(host, port):
        if host not in table:
            raise OSError("Name or service not known")
        return [ip_address(a) for a in table[host]]

    return Policy(config, resolver)


def test_exact_host_on_default_ports_is_allowed_and_pinned_to_the_checked_address():
    decision = policy([Rule(host="api.example.com")]).decide("API.example.com.", 443)
    assert decision.allowed and decision.address == PUBLIC and decision.rule == "api.example.com:443,80"


def test_anything_not_on_the_allowlist_is_refused_with_its_name():
    decision = policy([Rule(host="api.example.com")]).decide("evil.example.net", 443)
    assert not decision.allowed and decision.reason == "evil.example.net is not on this bottle's egress allowlist"


def test_wildcards_match_subdomains_only():
    p = policy([Rule(host="*.example.org")])
    assert p.decide("a.b.example.org", 443).allowed
    assert not p.decide("example.org", 443).allowed
    assert not p.decide("badexample.org", 443).allowed


def test_ports_are_checked():
    p = policy([Rule(host="api.example.com", ports=[8443])])
    assert p.decide("api.example.com", 8443).allowed
    assert "ports [8443] only, not 443" in p.decide("api.example.com", 443).reason


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("0.0.0.0", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("fe80::1", "link-local"),
        ("192.168.1.10", "private address this rule does not opt in"),
        ("10.0.0.5", "private address this rule does not opt in"),
        ("100.64.0.1", "private address this rule does not opt in"),
        ("192.168.38.2", "the bottle's own network"),
    ],
)
def test_an_allowed_name_resolving_somewhere_it_must_not_is_refused(address, why):
    decision = policy([Rule(host="rebind.example.com")], dns={"rebind.example.com": [address]}).decide(
        "rebind.example.com", 443
    )
    assert not decision.allowed and why in decision.reason and str(ip_address(address)) in decision.reason


def test_one_bad_address_among_good_ones_refuses_the_name():
    p = policy([Rule(host="mixed.example.com")], dns={"mixed.example.com": [PUBLIC, "127.0.0.1"]})
    assert not p.decide("mixed.example.com", 443).allowed


def test_a_rule_can_opt_in_a_private_cidr_but_never_the_bottles_own_network():
    rule = Rule(host="git.internal", cidrs=[ip_network("10.1.0.0/16")])
    p = policy([rule], dns={"git.internal": ["10.1.2.3"], "own.internal": ["192.168.38.1"]})
    assert p.decide("git.internal", 443).allowed
    p = policy([Rule(host="own.internal", cidrs=[ip_network("192.168.0.0/16")])], dns={"own.internal": ["192.168.38.1"]})
    assert "own network" in p.decide("own.internal", 443).reason


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::c0a8:2602", "64:ff9b::a00:5",  # NAT64 of forbidden IPv4s
        "64:ff9b:1::1", "64:ff9b:1:7f00:0:100::",  # local-use NAT64
        "2002:7f00:1::1", "2002:a9fe:a9fe::", "2002:c0a8:2602::",  # 6to4
        "::7f00:1", "::a9fe:a9fe", "::c0a8:2602",  # IPv4-compatible
        "::ffff:0:7f00:1", "::ffff:0:a9fe:a9fe",  # SIIT IPv4-translated
        "::ffff:169.254.169.254", "::ffff:192.168.38.2",  # IPv4-mapped
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo whose client is 127.0.0.1
        "fec0::1", "fd00:ec2::254",
    ],
)  # fmt: skip
def test_ipv6_forms_of_forbidden_addresses_are_refused_even_when_private_space_is_opted_in(address):
    rule = Rule(host="v6.example.com", cidrs=[ip_network("fc00::/7")])
    decision = policy([rule], dns={"v6.example.com": [address]}).decide("v6.example.com", 443)
    assert not decision.allowed, (address, decision)


@pytest.mark.parametrize("address", ["64:ff9b::5db8:d822", "2002:5db8:d822::1", "::ffff:93.184.216.34", "2606:4700::1"])
def test_ipv6_forms_of_public_addresses_are_allowed(address):
    decision = policy([Rule(host="v6.example.com")], dns={"v6.example.com": [address]}).decide("v6.example.com", 443)
    assert decision.allowed, decision


def test_cloud_metadata_addresses_are_refused_inside_opted_in_ranges():
    rule = Rule(host="meta.example.com", cidrs=[ip_network("100.64.0.0/10"), ip_network("fc00::/7")])
    for address in ["100.100.100.200", "fd00:ec2::254", "169.254.169.254"]:
        assert not policy([rule], dns={"meta.example.com": [address]}).decide("meta.example.com", 443).allowed


def test_azure_wireserver_is_refused_though_it_is_a_public_address():
    decision = policy([Rule(host="wire.example.com")], dns={"wire.example.com": ["168.63.129.16"]})
    assert not decision.decide("wire.example.com", 80).allowed


@pytest.mark.parametrize("cidr", ["127.0.0.0/8", "169.254.0.0/16", "8.8.8.0/24", "0.0.0.0/0"])
def test_only_private_ranges_can_be_opted_in(cidr):
    with pytest.raises(ValueError, match="only private CIDRs can be opted in"):
        Rule(host="x.example.com", cidrs=[ip_network(cidr)])


def test_unresolvable_names_are_refused():
    decision = policy([Rule(host="nowhere.example.com")]).decide("nowhere.example.com", 443)
    assert not decision.allowed and "does not resolve" in decision.reason


def test_credentials_are_for_their_exact_host_only():
    config = {"host": "api.example.com", "header": "x-api-key", "template": "Bearer {secret}", "secret": "c0"}
    p = policy([Rule(host="*.example.com")], credentials=[config])
    assert p.headers_for("api.example.com", {"c0": "s3cret"}) == {"x-api-key": "Bearer s3cret"}
    assert p.headers_for("other.example.com", {"c0": "s3cret"}) == {}


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/v1/x?key=abc&flag&n=2", "/v1/x?key=REDACTED&REDACTED&n=REDACTED"),
        ("/plain", "/plain"),
        ("/a?sk-ant-secret", "/a?REDACTED"),  # a bare value, no name
        ("/a?key%3Dsk-secret", "/a?REDACTED"),  # a percent-encoded `=` hides the value in the name
        ("/a?a=1;token=sk-secret", "/a?a=REDACTED;token=REDACTED"),
        ("/a?x=1;sk-secret", "/a?x=REDACTED;REDACTED"),
        ("/files;jsessionid=sk-secret/x", "/files;jsessionid=REDACTED/x"),
        ("/files;sk-secret/x", "/files;REDACTED/x"),
        ("/a?%73k=secret", "/a?REDACTED"),  # an encoded name is not a plain name
        ("/a#sk-secret", "/a"),
        ("/a%3Btok%3Dsk-secret", "/a;tok=REDACTED"),  # an encoded `;` parameter is a parameter
        ("/a?c2stc2VjcmV0==&x=1", "/a?REDACTED&x=REDACTED"),  # a base64 token with its padding
        ("/a?" + "t" * 40 + "=1", "/a?REDACTED"),  # a "name" that long is more likely a token
    ],
)
def test_nothing_but_parameter_names_reaches_the_log(path, logged):
    assert redact_path(path) == logged


def test_a_bad_config_is_refused_with_one_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"allow": [{"host": "x.com", "ports": [0]}]}')
    with pytest.raises(ValueError, match=r"invalid bundle config .*config.json: allow.0.ports.0"):
        BundleConfig.load(path)
    path.write_text('{"allow": [], "surprise": true}')
    with pytest.raises(ValueError, match="surprise"):
        BundleConfig.load(path)
    with pytest.raises(ValueError, match="cannot read"):
        BundleConfig.load(tmp_path / "missing.json")
    for port in (0, 65536, -1):
        path.write_text(json.dumps({"port": port}))
        with pytest.raises(ValueError, match="port"):
            BundleConfig.load(path)


@pytest.mark.parametrize("template", ["Bearer {secret}\r\nX-Evil: 1", "no placeholder", "{secret}{secret}", ""])
def test_a_credential_template_must_be_one_clean_header_value(template):
    with pytest.raises(ValueError, match="must hold"):
        BundleConfig(credentials=[{"host": "a.example", "header": "x", "template": template, "secret": "c0"}])
