from ipaddress import IPv4Network

import pytest

from bottle.addressing import (
    DEFAULT_POOL,
    Addresses,
    derive_subnet,
    host_routes,
    ipv4_subnets,
    parse_pool,
    pool_from_env,
)
from bottle.errors import AddressPoolExhausted, UsageError

net = IPv4Network


def slug_landing_on(octet: int) -> str:
    """A slug whose hashed slot in the default pool is 192.168.<octet>.0/24."""
    for i in range(100_000):
        slug = f"s{i}"
        if derive_subnet(slug, DEFAULT_POOL, []) == net(f"192.168.{octet}.0/24"):
            return slug
    raise AssertionError("no slug found")


def test_the_same_slug_always_gets_the_same_subnet():
    # Pinned: a change here moves every existing user's bottles to new addresses.
    assert derive_subnet("claude-code", DEFAULT_POOL, []) == net("192.168.38.0/24")
    assert derive_subnet("claude-code", DEFAULT_POOL, []) == derive_subnet("claude-code", DEFAULT_POOL, [])


def test_different_slugs_spread_over_the_pool():
    subnets = {derive_subnet(f"bottle-{i}", DEFAULT_POOL, []) for i in range(50)}
    assert len(subnets) > 35


def test_gateway_is_dot_one_and_bundle_dot_two():
    addresses = Addresses.of(net("192.168.38.0/24"))
    assert (str(addresses.gateway), str(addresses.bundle_ip)) == ("192.168.38.1", "192.168.38.2")


def test_third_octet_17_is_never_handed_out():
    slug = slug_landing_on(16)
    assert derive_subnet(slug, DEFAULT_POOL, [net("192.168.16.0/24")]) == net("192.168.18.0/24")
    every = {derive_subnet(f"n{i}", DEFAULT_POOL, []) for i in range(3000)}
    assert net("192.168.17.0/24") not in every
    assert len(every) == 255


@pytest.mark.parametrize(
    "taken",
    [
        [net("192.168.38.0/24")],  # the same /24
        [net("192.168.32.0/20")],  # a larger network around it
        [net("192.168.38.128/25")],  # a smaller network inside it
        [net("192.168.38.200/32")],  # a single host route
    ],
)
def test_probing_moves_past_every_kind_of_overlap(taken):
    subnet = derive_subnet("claude-code", DEFAULT_POOL, taken)
    assert not any(subnet.overlaps(t) for t in taken)
    if taken[0].prefixlen >= 24:
        assert subnet == net("192.168.39.0/24")  # the very next slot: probing is deterministic
    else:
        assert subnet == net("192.168.48.0/24")


def test_probing_wraps_around_the_end_of_the_pool():
    slug = slug_landing_on(255)
    assert derive_subnet(slug, DEFAULT_POOL, [net("192.168.255.0/24")]) == net("192.168.0.0/24")


def test_networks_outside_the_pool_and_ipv6_do_not_matter():
    assert derive_subnet("claude-code", DEFAULT_POOL, [net("10.0.0.0/8"), net("172.17.0.0/16")]) == net(
        "192.168.38.0/24"
    )


def test_an_exhausted_pool_says_so_and_how_to_widen_it():
    taken = [net(f"192.168.{i}.0/24") for i in range(256) if i != 17]
    with pytest.raises(AddressPoolExhausted) as info:
        derive_subnet("claude-code", DEFAULT_POOL, taken)
    assert "no free /24 is left in the subnet pool 192.168.0.0/16" in str(info.value)
    assert "BOTTLE_SUBNET_POOL=10.0.0.0/8" in str(info.value)


def test_a_wider_pool_hands_out_more_subnets():
    pool = net("10.0.0.0/8")
    subnet = derive_subnet("claude-code", pool, [])
    assert subnet.subnet_of(pool) and subnet.prefixlen == 24
    assert (int(subnet.network_address) >> 8) & 0xFF != 17


def test_pool_comes_from_the_environment_and_is_validated(monkeypatch):
    assert pool_from_env() == DEFAULT_POOL
    monkeypatch.setenv("BOTTLE_SUBNET_POOL", "10.0.0.0/8")
    assert pool_from_env() == net("10.0.0.0/8")
    for bad in ["10.0.0.0/33", "banana", "8.8.0.0/16", "10.0.0.0/25", "10.0.0.1/8"]:
        with pytest.raises(UsageError, match="BOTTLE_SUBNET_POOL"):
            parse_pool(bad)


@pytest.mark.parametrize("pool", ["127.0.0.0/8", "169.254.0.0/16", "0.0.0.0/8", "240.0.0.0/8", "100.64.0.0/10",
                                  "192.0.2.0/24", "198.18.0.0/15", "172.0.0.0/8", "192.168.0.0/15"])  # fmt: skip
def test_only_rfc_1918_ranges_make_a_pool(pool):
    with pytest.raises(UsageError, match="inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16"):
        parse_pool(pool)


@pytest.mark.parametrize("pool", ["10.0.0.0/8", "172.16.0.0/12", "172.31.0.0/16", "192.168.0.0/16", "10.9.8.0/24"])
def test_every_rfc_1918_range_makes_a_pool(pool):
    assert parse_pool(pool) == net(pool)


def test_host_routes_are_read_from_the_kernel_table(tmp_path):
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"  # default route: left out
        "eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"  # 192.168.1.0/24
        "docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"  # 172.17.0.0/16
    )
    assert host_routes(table) == [net("192.168.1.0/24"), net("172.17.0.0/16")]
    assert host_routes(tmp_path / "missing") == []


def test_ipv4_subnets_reads_docker_ipam_and_skips_the_rest():
    attrs = {"IPAM": {"Config": [{"Subnet": "192.168.5.0/24"}, {"Subnet": "fd00::/64"}, {"Subnet": "junk"}, {}]}}
    assert ipv4_subnets(attrs) == [net("192.168.5.0/24")]
    assert ipv4_subnets({"IPAM": {"Config": None}}) == []
