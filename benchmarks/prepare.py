"""Figures for `prepare`: latency against FakeDocker as networks pile up, pool capacity, and the cost
over the bare Docker SDK call against the real Engine. Run: .venv/bin/python benchmarks/prepare.py

Every figure that compares is a ratio against a baseline measured in the same run, since the
machines this runs on are shared and noisy.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from ipaddress import IPv4Network
from pathlib import Path

import docker
from docker.types import IPAMConfig, IPAMPool

from bottle.backend import LABEL_SLUG, PreflightReport
from bottle.backends.smolmachines import SmolmachinesBackend
from bottle.addressing import blocked_slots, first_free, host_routes, ipv4_subnets
from bottle.errors import AddressPoolExhausted
from bottle.manifest import parse_manifest
from bottle.state import StateStore
from bottle.testing import FakeDocker

REPORT = PreflightReport(backend="smolmachines", checks=[])


def manifest(name: str):
    return parse_manifest({"name": name, "agent": {"image": "debian:bookworm"}})


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def fake_with_networks(count: int) -> FakeDocker:
    """A FakeDocker already holding `count` foreign networks, spread over 10.0.0.0/8 (outside the pool)."""
    client = FakeDocker()
    for i in range(count):
        client.engine._add_network(f"other-{i}", "bridge", [{"Subnet": f"10.{i >> 8}.{i & 255}.0/24"}], {})
    return client


def latency_vs_network_count(state: StateStore, rounds: int) -> None:
    print("prepare latency against FakeDocker (median of fresh bottles; ratio to 0 networks)")
    backend = SmolmachinesBackend(routes=[])
    baseline = None
    for count in (0, 100, 1_000, 10_000):
        client = fake_with_networks(count)
        samples = []
        for i in range(rounds):
            start = time.perf_counter()
            backend.prepare(manifest(f"lat-{count}-{i}"), docker=client, state=state, preflight=REPORT)
            samples.append(time.perf_counter() - start)
        ms = median_ms(samples)
        baseline = baseline or ms
        print(f"  {count:>6} networks: {ms:8.2f} ms   x{ms / baseline:6.1f}")


def capacity_default_pool(state: StateStore) -> None:
    client, backend, fitted = FakeDocker(), SmolmachinesBackend(routes=[]), 0
    try:
        while True:
            backend.prepare(manifest(f"cap-{fitted}"), docker=client, state=state, preflight=REPORT)
            fitted += 1
    except AddressPoolExhausted:
        pass
    print(f"bottles that fit in 192.168.0.0/16 (full prepare through FakeDocker): {fitted}")


def capacity_wide_pool() -> None:
    # Full prepares would list up to 65k networks each (quadratic); the allocator alone, with the taken
    # set kept incrementally, answers the capacity question with the same probing code prepare uses.
    pool, blocked, fitted = IPv4Network("10.0.0.0/8"), set(), 0
    start = time.perf_counter()
    try:
        while True:
            subnet = first_free(f"cap-{fitted}", pool, blocked)
            blocked |= blocked_slots(pool, [subnet])
            fitted += 1
    except AddressPoolExhausted:
        pass
    print(f"bottles that fit in 10.0.0.0/8 (allocator, incremental): {fitted} in {time.perf_counter() - start:.1f} s")


def real_engine_ratio(state: StateStore, rounds: int) -> None:
    client = docker.from_env()
    backend = SmolmachinesBackend()
    run = uuid.uuid4().hex[:6]
    bare, ours = [], []
    try:
        for i in range(rounds):
            taken = [s for n in client.networks.list() for s in ipv4_subnets(n.attrs)] + host_routes()
            subnet = first_free(f"bench-bare-{run}-{i}", IPv4Network("192.168.0.0/16"), blocked_slots(
                IPv4Network("192.168.0.0/16"), taken))
            ipam = IPAMConfig(pool_configs=[IPAMPool(subnet=str(subnet), gateway=str(subnet.network_address + 1))])
            start = time.perf_counter()
            network = client.networks.create(
                f"bench-bare-{run}-{i}", driver="bridge", ipam=ipam, labels={"bottle.test": run}, check_duplicate=True
            )
            bare.append(time.perf_counter() - start)
            network.remove()

            start = time.perf_counter()
            plan = backend.prepare(manifest(f"bench-{run}-{i}"), docker=client, state=state, preflight=REPORT)
            ours.append(time.perf_counter() - start)
            client.networks.get(plan.network_id).remove()
    finally:
        for network in client.networks.list(filters={"label": "bottle.test=" + run}):
            network.remove()
        for network in client.networks.list(filters={"label": LABEL_SLUG}):
            if network.name.startswith(f"bottle-bench-{run}"):
                network.remove()
    b, o = median_ms(bare), median_ms(ours)
    print(f"real Engine, median of {rounds}: bare networks.create {b:.1f} ms, bottle prepare {o:.1f} ms, "
          f"ratio x{o / b:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--no-docker", action="store_true", help="skip the real-Engine comparison")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = StateStore(Path(tmp))
        latency_vs_network_count(state, args.rounds)
        capacity_default_pool(state)
        capacity_wide_pool()
        if not args.no_docker:
            real_engine_ratio(state, args.rounds)


if __name__ == "__main__":
    main()
