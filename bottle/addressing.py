"""Slug → the bottle's /24, gateway and bundle IP: stable for a slug, never overlapping what exists."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from bottle.errors import AddressPoolExhausted, UsageError

DEFAULT_POOL = IPv4Network("192.168.0.0/16")
# The only ranges a pool may come from (RFC 1918). Python's `is_private` also says yes to loopback,
# link-local, 0/8 and 240/4, where a docker bridge would shadow the host's own traffic.
POOL_RANGES = tuple(IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
POOL_ENV = "BOTTLE_SUBNET_POOL"
# A /24 whose third octet is 17 is never handed out: 172.17.0.0/16 is Docker's default bridge, and
# x.x.17.0/24 is skipped in every pool so a bottle's subnet never depends on which pool is configured.
SKIPPED_OCTET = 17


@dataclass(frozen=True)
class Addresses:
    """A bottle's network: its /24, the docker gateway (.1) and the bundle's pinned IP (.2)."""

    subnet: IPv4Network
    gateway: IPv4Address
    bundle_ip: IPv4Address

    @classmethod
    def of(cls, subnet: IPv4Network) -> Addresses:
        return cls(subnet, subnet.network_address + 1, subnet.network_address + 2)


def parse_pool(text: str) -> IPv4Network:
    """Validate a pool given by the user: an RFC 1918 IPv4 network from /8 to /24."""
    try:
        pool = IPv4Network(text.strip())
    except ValueError:
        raise UsageError(f"{POOL_ENV}={text!r} is not an IPv4 network such as 10.0.0.0/8") from None
    if not (8 <= pool.prefixlen <= 24 and any(pool.subnet_of(r) for r in POOL_RANGES)):
        raise UsageError(
            f"{POOL_ENV}={text!r} must be a private IPv4 network between /8 and /24 inside "
            "10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16"
        )
    return pool


def pool_from_env() -> IPv4Network:
    text = os.environ.get(POOL_ENV)
    return parse_pool(text) if text else DEFAULT_POOL


def blocked_slots(pool: IPv4Network, taken: Iterable[IPv4Network]) -> set[int]:
    """Indexes of the pool's /24s that overlap any taken network."""
    base, last = int(pool.network_address), int(pool.broadcast_address)
    blocked: set[int] = set()
    for net in taken:
        lo, hi = max(int(net.network_address), base), min(int(net.broadcast_address), last)
        if lo <= hi:
            blocked.update(range((lo - base) >> 8, ((hi - base) >> 8) + 1))
    return blocked


def first_free(slug: str, pool: IPv4Network, blocked: set[int]) -> IPv4Network:
    """The /24 for `slug`: its hashed slot in the pool, or the next free one after it, wrapping around."""
    base, count = int(pool.network_address), pool.num_addresses >> 8
    start = int.from_bytes(hashlib.sha256(slug.encode()).digest()[:8], "big") % count
    for step in range(count):
        index = (start + step) % count
        network = base + (index << 8)
        if index not in blocked and (network >> 8) & 0xFF != SKIPPED_OCTET:
            return IPv4Network((network, 24))
    raise AddressPoolExhausted(
        f"no free /24 is left in the subnet pool {pool} ({len(blocked)} in use); "
        f"widen it with {POOL_ENV}=10.0.0.0/8, or remove docker networks you no longer need"
    )


def derive_subnet(slug: str, pool: IPv4Network, taken: Iterable[IPv4Network]) -> IPv4Network:
    """The /24 for `slug` given every network that already exists (docker's and the host's)."""
    return first_free(slug, pool, blocked_slots(pool, taken))


def host_routes(route_table: Path = Path("/proc/net/route")) -> list[IPv4Network]:
    """IPv4 networks this host already routes (its LAN, VPNs, bridges): a bottle's subnet avoids them.

    Linux only; elsewhere (and where the table cannot be read) the list is empty. The default route
    is left out, since it overlaps everything.
    """
    if not sys.platform.startswith("linux"):
        return []
    try:
        lines = route_table.read_text().splitlines()[1:]
    except OSError:
        return []
    routes = []
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or fields[1] == "00000000":
            continue
        dest, mask = (IPv4Address(int(x, 16).to_bytes(4, sys.byteorder)) for x in (fields[1], fields[7]))
        try:
            routes.append(IPv4Network(f"{dest}/{mask}", strict=False))
        except ValueError:
            continue
    return routes


def ipv4_subnets(network_attrs: dict) -> list[IPv4Network]:
    """The IPv4 subnets in a docker network's IPAM config (IPv6 and unparsable entries are skipped)."""
    subnets = []
    for config in (network_attrs.get("IPAM") or {}).get("Config") or []:
        try:
            subnets.append(IPv4Network(config.get("Subnet", ""), strict=False))
        except ValueError:  # IPv6, or not an address at all
            continue
    return subnets
