"""Figures for the bundle's proxy: added latency and requests/s against a direct connection and
against tinyproxy (Debian's reference forward proxy), same machine, same run.

Run: .venv/bin/python benchmarks/proxy.py [--requests N] [--workers N]
Needs: tinyproxy on PATH (apt-get install tinyproxy), a Docker Engine (for a bridge address to serve
the upstream on; no container is started). All traffic stays on this machine.

Modes, each request on a fresh connection (CONNECT, TLS handshake(s), one GET):
  direct       client -> upstream (TLS)
  tinyproxy    client -> tinyproxy CONNECT tunnel -> upstream (TLS end to end)
  passthrough  client -> bundle CONNECT tunnel (rule with intercept = false; relayed by the front door) -> upstream
  intercepted  client -> bundle (TLS with the bottle CA) -> bundle -> upstream (TLS), policy applied

Then a concurrency figure: 64 clients at once through the bundle (passthrough, one request a second
each), first all to a name that resolves at once, then with one of them on a name whose resolution
takes 2 s; the others' p99 in the second run as a ratio to the first.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import ssl
import statistics
import subprocess
import tempfile
import threading
import time
from ipaddress import ip_address
from pathlib import Path

import docker
from docker.types import IPAMConfig, IPAMPool

from bottle.addressing import DEFAULT_POOL, derive_subnet, host_routes, ipv4_subnets
from bottle.bundle.ca import CA_FILE, create_ca
from bottle.bundle.policy import BundleConfig, Rule
from bottle.testing.upstream import echo_server, free_port

TABLE: dict[str, str] = {}


SLOW_NAME = "slow.test"  # resolves after 2 s, like a name whose DNS server is far away or down


def table_resolver(host: str, port: int):
    if host == SLOW_NAME:
        time.sleep(2)
    return [ip_address(TABLE[host])]


def run_bundle(config_json: str, ca_file: str, table: dict[str, str], port: int, upstream_ca: str,
               dns_port: int) -> None:
    """The bundle's proxy in its own process (so the load generator does not share its GIL), on the event
    loop the bundle's entry point uses."""
    from bottle.bundle.__main__ import run, serve

    TABLE.update(table)
    config = BundleConfig.model_validate_json(config_json).model_copy(update={"port": port, "dns_port": dns_port})
    run(serve(config, {}, Path(ca_file), listen_host="127.0.0.1", resolver=table_resolver,
              audit=lambda entry: None, upstream_ca=Path(upstream_ca)))  # fmt: skip


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def tunnel(proxy_port: int, host: str, port: int) -> socket.socket:
    """A CONNECT tunnel through the proxy on 127.0.0.1:proxy_port."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("the proxy closed the tunnel")
        reply += chunk
    if not reply.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
        raise RuntimeError(f"CONNECT refused: {reply[:60]!r}")
    return sock


def one_request(mode: str, env: dict, name: str = "upstream.test") -> None:
    """One GET on a fresh connection; TLS always verifies `name` against the mode's CA."""
    if mode == "direct":
        raw, cafile = socket.create_connection((env["gateway"], env["port"]), timeout=10), env["upstream_ca"]
    else:
        proxy_port, target, cafile = env["modes"][mode]
        raw = tunnel(proxy_port, name if target == "upstream.test" else target, env["port"])
    with ssl.create_default_context(cafile=cafile).wrap_socket(raw, server_hostname=name) as sock:
        sock.sendall(f"GET /echo HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    if response.split(b" ", 2)[1:2] != [b"200"]:
        raise RuntimeError(f"{mode}: {response[:60]!r}")


WARMUP = 20  # requests per mode before any is timed: the bundle's first ones import code and make its certificate
ROUNDS = 3  # the modes take turns, so a neighbour's load on the machine falls on all of them alike


def measure(modes: list[str], env: dict, requests: int, workers: int) -> dict[str, dict]:
    """p50/p99 of `requests` sequential requests and requests/s with `workers` threads, for each mode;
    the modes are measured in turns, a ROUNDS-th of the requests each turn, after WARMUP requests each."""
    latencies: dict[str, list[float]] = {mode: [] for mode in modes}
    done, elapsed = dict.fromkeys(modes, 0), dict.fromkeys(modes, 0.0)
    for mode in modes:
        for _ in range(WARMUP):
            one_request(mode, env)
    for _ in range(ROUNDS):
        for mode in modes:
            for _ in range(requests // ROUNDS):
                start = time.perf_counter()
                one_request(mode, env)
                latencies[mode].append(time.perf_counter() - start)

            def worker(mode: str = mode) -> None:
                for _ in range(requests // ROUNDS // workers):
                    one_request(mode, env)
                    done[mode] += 1

            threads = [threading.Thread(target=worker) for _ in range(workers)]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed[mode] += time.perf_counter() - start
    results = {}
    for mode, samples in latencies.items():
        samples.sort()
        results[mode] = {
            "p50": statistics.median(samples) * 1000,
            "p99": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1000,
            "rps": done[mode] / elapsed[mode],
        }
    return results


def concurrency(env: dict, clients: int = 64, rounds: int = 4, pause: float = 1.0) -> tuple[float, float, int]:
    """p99 (ms) of `clients` concurrent clients through the passthrough bundle, each making a request
    every `pause` seconds (a load the bundle sustains, so the figure shows stalls, not saturation),
    without and with one of them on the slow name, whose own requests are not counted; and failures."""
    failures = [0]

    def run(with_slow: bool) -> float:
        latencies: list[float] = []
        barrier = threading.Barrier(clients)

        def client(index: int) -> None:
            name = SLOW_NAME if with_slow and index == 0 else "upstream.test"
            barrier.wait()
            for _ in range(rounds):
                start = time.perf_counter()
                try:
                    one_request("passthrough", env, name)
                except (OSError, RuntimeError):
                    failures[0] += 1
                    continue
                if name != SLOW_NAME:
                    latencies.append(time.perf_counter() - start)
                time.sleep(max(0.0, pause - (time.perf_counter() - start)))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        latencies.sort()
        return latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000

    return run(False), run(True), failures[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    client = docker.from_env()
    taken = [s for n in client.networks.list() for s in ipv4_subnets(n.attrs)] + host_routes()
    subnet = derive_subnet("bench-proxy", DEFAULT_POOL, taken)
    gateway = str(subnet.network_address + 1)
    network = client.networks.create(
        "bottle-bench-proxy", ipam=IPAMConfig(pool_configs=[IPAMPool(subnet=str(subnet), gateway=gateway)]),
        labels={"bottle.test": "bench"},
    )  # fmt: skip
    processes: list = []
    try:
        with tempfile.TemporaryDirectory() as tmp, echo_server(gateway, tls_names=["upstream.test", SLOW_NAME],
                                                               workdir=Path(tmp)) as upstream:  # fmt: skip
            key, cert = create_ca("bottle bench CA")
            (Path(tmp) / CA_FILE).write_bytes(key + cert)
            (Path(tmp) / "bundle-ca.pem").write_bytes(cert)
            port = upstream["port"]
            modes = {}

            tiny_port = free_port()
            (Path(tmp) / "tinyproxy.conf").write_text(
                f"Port {tiny_port}\nListen 127.0.0.1\nAllow 127.0.0.1\nConnectPort {port}\nLogLevel Critical\n"
                "MaxClients 200\nTimeout 30\n"
            )
            processes.append(subprocess.Popen(["tinyproxy", "-d", "-c", str(Path(tmp) / "tinyproxy.conf")],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
            modes["tinyproxy"] = (tiny_port, gateway, str(upstream["ca"]))

            for mode, intercept, cafile in [("passthrough", False, str(upstream["ca"])),
                                            ("intercepted", True, str(Path(tmp) / "bundle-ca.pem"))]:  # fmt: skip
                config = BundleConfig(allow=[Rule(host=name, ports=[port], cidrs=[subnet], intercept=intercept)
                                             for name in ("upstream.test", SLOW_NAME)])  # fmt: skip
                bundle_port = free_port()
                process = multiprocessing.Process(
                    target=run_bundle,
                    args=(config.model_dump_json(), str(Path(tmp) / CA_FILE), {"upstream.test": gateway, SLOW_NAME: gateway},
                          bundle_port, str(upstream["ca"]), free_port(udp=True)),
                    daemon=True,
                )  # fmt: skip
                process.start()
                processes.append(process)
                modes[mode] = (bundle_port, "upstream.test", cafile)
            for proxy_port, _, _ in modes.values():
                wait_for_port(proxy_port)

            env = {"gateway": gateway, "port": port, "upstream_ca": str(upstream["ca"]), "modes": modes}
            results = measure(["direct", *modes], env, args.requests, args.workers)
            calm, stalled, failed = concurrency(env)
    finally:
        for process in processes:
            (process.terminate if hasattr(process, "terminate") else process.kill)()
        network.remove()

    base, tiny = results["direct"], results["tinyproxy"]
    print(f"{args.requests} requests each (after {WARMUP} untimed, modes in {ROUNDS} turns), fresh TLS connection per "
          f"request; throughput with {args.workers} workers")
    print(f"{'mode':<12} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} {'req/s':>7} "
          f"{'vs direct':>9} {'vs tinyproxy':>12}")  # fmt: skip
    for mode, r in results.items():
        print(f"{mode:<12} {r['p50']:8.2f} {r['p99']:8.2f} {r['p50'] - base['p50']:8.2f} "
              f"{r['p99'] - base['p99']:8.2f} {r['rps']:7.0f} {r['rps'] / base['rps']:9.2f} "
              f"{r['rps'] / tiny['rps']:12.2f}")  # fmt: skip
    print(f"64 concurrent clients through passthrough, one request a second each: p99 {calm:.0f} ms; with one of "
          f"them on a name that takes 2 s to resolve: p99 {stalled:.0f} ms for the others (x{stalled / calm:.2f}); "
          f"{failed} failed requests")


if __name__ == "__main__":
    main()
