"""Figures for the bottle lifecycle against the real Docker Engine and smolvm with its boot faked.

Run: .venv/bin/python benchmarks/lifecycle.py [--rounds N]

0. The docker backend: `up --detach` + `down` against the bare Docker SDK calls it makes (two networks,
   the real bundle at its pinned IPs, the wait for its port, the agent's container, the one-shot helper
   that removes its default route; then removing them), as
   a ratio measured in the same run, rounds interleaved; and the time from calling `up` to the end of
   the agent's first command inside its container (`true`, by exec), absolute.
1. smolmachines: `up --detach` + `down` (in-process, the same code the CLI runs) against the bare Docker SDK calls
   it makes (network create, container create + start at a pinned IP, wait for the port, remove
   both), as a ratio measured in the same run, rounds interleaved. smolvm's own time (the real binary's
   create/ls/delete, and the fake VM's start and the probe's exec) is shown apart; a real VM adds its
   boot time on top.
2. `ls` (the inventory behind it) with 0, 50 and 200 bottles up.

Needs a static busybox on PATH for the stand-in bundle image (apt-get install busybox-static).
Everything it creates is labelled and removed at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
from docker.types import IPAMConfig, IPAMPool

from bottle.addressing import DEFAULT_POOL, derive_subnet, host_routes, ipv4_subnets
from bottle.backend import LABEL_SLUG, PreflightReport
from bottle.backends.docker import DockerBackend
from bottle.backends.docker.launch import INTERNAL_OPTIONS
from bottle.backends.smolmachines import SmolmachinesBackend
from bottle.backends.smolmachines.smolvm import Smolvm, wheel_engine
from bottle.bundle import CA_DIR, CONFIG_FILE, SECRETS_FILE
from bottle.bundle.build import build as build_bundle
from bottle.bundle.ca import CA_FILE, create_ca
from bottle.bundle.policy import BundleConfig
from bottle.manifest import parse_manifest
from bottle.state import StateStore
from bottle.testing import fake_smolvm
from bottle.testing.images import READY_IMAGE, build_python_base, build_test_bundle

REAL_BUNDLE = "bottle-test-bundle:real"  # the bundle image built from this checkout, as the tests build it

REPORT = PreflightReport(backend="smolmachines", checks=[], facts={"smolvm_version": "1.32.2"})


def manifest(name: str):
    return parse_manifest({"name": name, "agent": {"image": "node:22"}, "bundle": {"image": READY_IMAGE}})


def quiet(step: str, detail: str) -> None:
    pass


def wait_for_port(ip: str, port: int = 8888) -> None:
    while True:
        try:
            socket.create_connection((ip, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)


def docker_bare_round(client: docker.DockerClient, name: str, bundle_image: str, bundle_dir: Path) -> float:
    """What a docker bottle's `up` + `down` do in docker, without bottle: two networks, the bundle at its
    pinned addresses and the wait for its port, the agent's container, the one-shot route helper; then
    removing them."""
    taken = [s for n in client.networks.list() for s in ipv4_subnets(n.attrs)] + host_routes()
    inside = derive_subnet(name, DEFAULT_POOL, taken)
    out = derive_subnet(f"{name}-egress", DEFAULT_POOL, [*taken, inside])
    label = {"bottle.test": "bench"}
    start = time.perf_counter()
    networks = []
    for net_name, subnet, internal in ((name, inside, True), (f"{name}-egress", out, False)):
        ipam = IPAMConfig(pool_configs=[IPAMPool(subnet=str(subnet), gateway=str(subnet.network_address + 1))])
        networks.append(client.networks.create(net_name, driver="bridge", ipam=ipam, labels=label, internal=internal,
                                                options=INTERNAL_OPTIONS if internal else {}))  # fmt: skip
    endpoint = {name: client.api.create_endpoint_config(ipv4_address=str(inside.network_address + 2))}
    bundle = client.containers.create(
        bundle_image, name=f"{name}-bundle", network=name, networking_config=endpoint, labels=label, read_only=True,
        cap_drop=["ALL"], user=f"{os.getuid()}:{os.getgid()}", tmpfs={"/tmp": "size=64m"},
        volumes={str(bundle_dir): {"bind": "/etc/bottle", "mode": "ro"}},
    )  # fmt: skip
    networks[1].connect(bundle, ipv4_address=str(out.network_address + 2))
    bundle.start()
    wait_for_port(str(out.network_address + 2))
    agent = client.containers.create(
        READY_IMAGE, name=f"{name}-agent", entrypoint=["sleep"], command=["2147483647"], network=name, labels=label,
        read_only=True, cap_drop=["ALL"], security_opt=["no-new-privileges"], init=True, pids_limit=1024,
        mem_limit="2g", tmpfs={"/tmp": "size=512m", "/workspace": "size=1g"}, dns=[str(inside.network_address + 2)],
        sysctls={"net.ipv6.conf.all.disable_ipv6": "1"},
    )  # fmt: skip
    agent.start()
    helper = client.containers.create(bundle_image, ["noroute"], network_mode=f"container:{agent.id}", user="0",
                                      cap_drop=["ALL"], cap_add=["NET_ADMIN"], labels=label)  # fmt: skip
    helper.start()
    helper.wait()
    for container in (helper, agent, bundle):
        container.remove(force=True)
    for network in networks:
        network.remove()
    return time.perf_counter() - start


def docker_figures(client: docker.DockerClient, state: StateStore, rounds: int, run: str, tmp: Path) -> None:
    backend = DockerBackend()
    report = backend.preflight(docker=client)
    bundle_image = build_bundle(client, base=build_python_base(client), tag=REAL_BUNDLE)
    bundle_dir = tmp / "bare-bundle"
    (bundle_dir / CA_DIR).mkdir(parents=True)
    key, cert = create_ca("benchmark CA")
    (bundle_dir / CA_DIR / CA_FILE).write_bytes(key + cert)
    (bundle_dir / CONFIG_FILE).write_text(BundleConfig().model_dump_json())
    (bundle_dir / SECRETS_FILE).write_text("{}")

    def docker_manifest(name: str):
        return parse_manifest({"name": name, "backend": "docker", "agent": {"image": READY_IMAGE},
                               "bundle": {"image": bundle_image}})  # fmt: skip

    bare, ours, first = [], [], []
    for i in range(rounds):
        bare.append(docker_bare_round(client, f"bench-dbare-{run}-{i}", bundle_image, bundle_dir))
        name = f"bench-d-{run}-{i}"
        start = time.perf_counter()
        plan = backend.up(docker_manifest(name), docker=client, state=state, preflight=report, on_step=quiet)
        up_done = time.perf_counter()
        code, _ = backend.run(plan, ["true"], docker=client, timeout=30)
        first_done = time.perf_counter()
        assert code == 0
        backend.down(name, docker=client, state=state)
        ours.append((up_done - start) + (time.perf_counter() - first_done))
        first.append(first_done - start)
    b, o, f = (statistics.median(x) * 1000 for x in (bare, ours, first))
    print(f"docker: up --detach + down, median of {rounds}: bare SDK {b:.0f} ms, bottle {o:.0f} ms (x{o / b:.2f}); "
          f"from up to the end of the agent's first command: {f:.0f} ms")


def bare_sdk_round(client: docker.DockerClient, name: str) -> float:
    """What `up` + `down` do in docker, without bottle: create, run at a pinned IP, wait, remove."""
    taken = [s for n in client.networks.list() for s in ipv4_subnets(n.attrs)] + host_routes()
    subnet = derive_subnet(name, DEFAULT_POOL, taken)
    ip = str(subnet.network_address + 2)
    start = time.perf_counter()
    ipam = IPAMConfig(pool_configs=[IPAMPool(subnet=str(subnet), gateway=str(subnet.network_address + 1))])
    network = client.networks.create(name, driver="bridge", ipam=ipam, labels={"bottle.test": "bench"})
    endpoint = {name: client.api.create_endpoint_config(ipv4_address=ip)}
    container = client.containers.create(
        READY_IMAGE, name=name, network=name, networking_config=endpoint, labels={"bottle.test": "bench"}
    )
    container.start()
    wait_for_port(ip)
    container.remove(force=True)
    network.remove()
    return time.perf_counter() - start


SMOLVM_SECONDS = [0.0]  # time spent inside smolvm calls (the real binary, and the fake VM's start and exec)


def _timed(call):
    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return call(self, *args, **kwargs)
        finally:
            SMOLVM_SECONDS[0] += time.perf_counter() - start

    return timed


Smolvm._run, Smolvm.exec = _timed(Smolvm._run), _timed(Smolvm.exec)


def bottle_round(client, backend, state, name: str) -> tuple[float, float]:
    """Seconds for up + down, and the part of them spent waiting on smolvm."""
    SMOLVM_SECONDS[0] = 0.0
    start = time.perf_counter()
    backend.up(manifest(name), docker=client, state=state, preflight=REPORT, on_step=quiet)
    backend.down(name, docker=client, state=state)
    return time.perf_counter() - start, SMOLVM_SECONDS[0]


def lifecycle_ratio(client, backend, state, rounds: int, run: str) -> None:
    backend.up(manifest(f"warm-{run}"), docker=client, state=state, preflight=REPORT, on_step=quiet)  # saves the image once
    backend.down(f"warm-{run}", docker=client, state=state)
    bare, ours, docker_side = [], [], []
    for i in range(rounds):
        bare.append(bare_sdk_round(client, f"bench-bare-{run}-{i}"))
        total, in_smolvm = bottle_round(client, backend, state, f"bench-{run}-{i}")
        ours.append(total)
        docker_side.append(total - in_smolvm)
    b, o, d = (statistics.median(x) * 1000 for x in (bare, ours, docker_side))
    print(f"up --detach + down, median of {rounds}: bare SDK {b:.0f} ms, bottle {o:.0f} ms (x{o / b:.2f}); "
          f"bottle without its smolvm calls {d:.0f} ms (x{d / b:.2f})")


def ls_scaling(client, backend, state, run: str) -> None:
    print("ls (inventory) with N bottles up, median of 5; ratio to 0 bottles")
    made: list[str] = []
    baseline = None
    for count in (0, 50, 200):
        names = [f"ls-{run}-{i}" for i in range(len(made), count)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: backend.up(manifest(n), docker=client, state=state, preflight=REPORT,
                                               on_step=quiet), names))
        made += names
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            found = backend.inventory(docker=client, state=state)
            samples.append(time.perf_counter() - start)
        assert len(found) == count, (len(found), count)
        ms = statistics.median(samples) * 1000
        baseline = baseline or ms
        print(f"  {count:>4} bottles: {ms:8.1f} ms   x{ms / baseline:5.1f}")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: backend.down(n, docker=client, state=state), made))


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(143)  # so that `finally` removes what the run made, as it does on Ctrl-C


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--only", choices=["docker", "smolmachines"], help="Measure one backend only.")
    args = parser.parse_args()
    client = docker.from_env()
    build_test_bundle(client, READY_IMAGE)
    run = uuid.uuid4().hex[:6]
    with tempfile.TemporaryDirectory() as tmp:
        state = StateStore(Path(tmp) / "home")
        real = wheel_engine(state)
        if real is None:
            raise SystemExit("the smolmachines wheel is not installed: pip install -e '.[test]'")
        smolvm_state = Path(tmp) / "smolvm"
        os.environ["BOTTLE_SMOLVM"] = str(fake_smolvm.install(Path(tmp) / "bin", smolvm_state, real, READY_IMAGE))
        backend = SmolmachinesBackend()
        try:
            if args.only != "smolmachines":
                docker_figures(client, state, args.rounds, run, Path(tmp))
            if args.only != "docker":
                lifecycle_ratio(client, backend, state, args.rounds, run)
                ls_scaling(client, backend, state, run)
        finally:
            fake_smolvm.cleanup(smolvm_state)
            for label in ("bottle.test=bench", LABEL_SLUG):
                for container in client.containers.list(all=True, filters={"label": label}):
                    if run in container.name:
                        container.remove(force=True)
                for network in client.networks.list(filters={"label": label}):
                    if run in network.name:
                        network.remove()


if __name__ == "__main__":
    main()
