"""The bundle's policy, stated as invariants and checked over generated hosts, rules, addresses and paths."""

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from bottle.bundle.policy import BundleConfig, Policy, Rule, redact_path

OWN = ipaddress.ip_network("192.168.38.0/24")
OPT_INS = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
                                             "fc00::/7", "10.1.0.0/16", "fd00::/8")]  # fmt: skip

labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
hosts = st.lists(labels, min_size=1, max_size=4).map(".".join)
ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
ipv6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
special_v4 = st.sampled_from(["127.0.0.1", "169.254.169.254", "10.0.0.5", "192.168.38.2", "0.0.0.0", "100.100.100.200",
                              "224.0.0.1", "255.255.255.255", "93.184.216.34"]).map(ipaddress.IPv4Address)  # fmt: skip
embedded = st.tuples(st.sampled_from(["mapped", "compat", "siit", "nat64", "6to4", "teredo"]), special_v4).map(
    lambda pair: _embed(*pair)
)
addresses = st.lists(st.one_of(ipv4, ipv6, special_v4, embedded), min_size=1, max_size=4)


def _embed(form: str, v4: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    n = int(v4)
    return ipaddress.IPv6Address({
        "mapped": (0xFFFF << 32) | n, "compat": n if n > 1 else n + 2, "siit": (0xFFFF << 48) | n,
        "nat64": (0x64FF9B << 96) | n, "6to4": (0x2002 << 112) | (n << 80),
        "teredo": (0x20010000 << 96) | (n << 64) | (0xFFFFFFFF ^ n),
    }[form])  # fmt: skip


def _carried(address) -> list:
    """The IPv4 addresses an address stands for, read with the standard library's own properties."""
    if address.version == 4:
        return [address]
    found = [a for a in (address.ipv4_mapped, address.sixtofour) if a]
    found += list(address.teredo or [])
    if address in ipaddress.ip_network("64:ff9b::/96") or address in ipaddress.ip_network("::ffff:0:0:0/96") or (
        address in ipaddress.ip_network("::/96") and int(address) > 1
    ):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found or [address]


def _never(address) -> bool:
    return (address.is_loopback or address.is_link_local or address.is_multicast or address.is_unspecified
            or address.is_reserved or address in OWN or str(address) in {"100.100.100.200", "fd00:ec2::254", "168.63.129.16"})  # fmt: skip


def policy(rules, table):
    return Policy(BundleConfig(allow=rules, refuse=[OWN]), lambda host, port: table[host])


@settings(max_examples=400, deadline=None)
@given(host=hosts, found=addresses, cidrs=st.lists(st.sampled_from(OPT_INS), max_size=3))
def test_never_an_address_of_a_forbidden_class_whatever_is_opted_in(host, found, cidrs):
    decision = policy([Rule(host=host, cidrs=cidrs)], {host: found}).decide(host, 443)
    if decision.allowed:
        for address in found:
            for meant in _carried(address):
                assert not _never(meant), (address, meant)
                assert meant.is_global or any(meant in c for c in cidrs if c.version == meant.version), (address, meant)
        assert decision.address in found


@settings(max_examples=300, deadline=None)
@given(host=hosts, suffix=hosts, port=st.integers(1, 65535), ports=st.lists(st.integers(1, 65535), min_size=1))
def test_a_wildcard_matches_strict_subdomains_on_its_ports_only(host, suffix, port, ports):
    public = [ipaddress.ip_address("93.184.216.34")]
    decision = policy([Rule(host=f"*.{suffix}", ports=ports)], {host: public}).decide(host, port)
    assert decision.allowed == (host.endswith(f".{suffix}") and port in ports)


@settings(max_examples=200, deadline=None)
@given(requests=st.lists(st.tuples(hosts, st.sampled_from([80, 443, 8443]), addresses), min_size=2, max_size=8))
def test_a_decision_depends_on_the_rules_and_the_request_alone(requests):
    rules = [Rule(host=h, cidrs=OPT_INS[:3]) for h, _, _ in requests[::2]]
    table = {h: found for h, _, found in requests}
    seasoned = policy(rules, table)
    for host, port, _ in requests:  # earlier requests change nothing for later ones
        seasoned.decide(host, port)
    for host, port, _ in requests:
        assert seasoned.decide(host, port) == policy(rules, table).decide(host, port)


MARK = "v4lu3"
token = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/_-", max_size=12)
values = st.tuples(token, st.sampled_from(["", "=", "=="])).map(lambda t: MARK + t[0] + t[1])  # base64-like
names = st.text("abcdefghijklmnopqrstuvwxyz_-", min_size=0, max_size=6)
pieces = st.one_of(st.tuples(names, values).map("=".join), values, st.tuples(names, values).map("%3D".join),
                   st.tuples(names, values).map("%3d".join))  # fmt: skip
seps = st.sampled_from(["&", ";", "&&"])


@settings(max_examples=400, deadline=None)
@given(segments=st.lists(names, max_size=4), params=st.lists(pieces, max_size=4), query=st.lists(pieces, max_size=5),
       sep=seps)  # fmt: skip
def test_no_parameter_value_ever_reaches_the_log(segments, params, query, sep):
    path = "/" + "/".join(segments) + "".join(";" + p for p in params) + ("?" + sep.join(query) if query else "")
    assert MARK not in redact_path(path), path
