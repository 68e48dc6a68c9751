"""Figures for the kubernetes backend against a real kube-apiserver (1.20.2, with etcd, on loopback).

Run: .venv/bin/python benchmarks/kube_lifecycle.py [--rounds N]

`up --detach` + `down` (in-process, the code the CLI runs) against the bare API calls a hand-written
client would make for the same bottle: the same nine objects created in the same order, the same waits
for the agent's and the bundle's Pods, the same deletes. A stand-in kubelet (bottle.testing.kube_apiserver)
reports each Pod running and ready within 0.2 s for both, and both poll a Pod every 0.5 s, so the ratio
is bottle's own overhead: rendering, the uid record, adoption checks, the files it writes. Rounds are
interleaved and the ratio of medians is reported, since the machine is shared.

Builds the API server the first time (tests/support/kube-apiserver.sh, about 6 minutes); everything it
starts is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import kubernetes

from bottle import sidecar
from bottle.backend import PreflightReport
from bottle.backends.kubernetes import KubernetesBackend
from bottle.backends.kubernetes.launch import filled
from bottle.manifest import parse_manifest
from bottle.state import StateStore
from bottle.testing import kube_apiserver

ROOT = Path(__file__).resolve().parents[1]


def manifest(name: str):
    return parse_manifest({"name": name, "backend": "kubernetes", "agent": {"image": "agent:1"},
                           "egress": {"allow": ["pypi.org"]}})  # fmt: skip


def wait(core, name: str, namespace: str, done) -> None:
    while not done(core.read_namespaced_pod(name, namespace)):
        time.sleep(0.5)


def bare(api, core, plan, state) -> None:
    """The bottle's objects by hand: create in order, wait for the Pods, delete in reverse."""
    objects = [filled(obj, plan, state) for obj in plan.objects]
    networking = kubernetes.client.NetworkingV1Api(api)
    ns = plan.namespace
    create = {
        "Namespace": lambda o: core.create_namespace(o),
        "NetworkPolicy": lambda o: networking.create_namespaced_network_policy(ns, o),
        "Secret": lambda o: core.create_namespaced_secret(ns, o),
        "ConfigMap": lambda o: core.create_namespaced_config_map(ns, o),
        "Service": lambda o: core.create_namespaced_service(ns, o),
        "Pod": lambda o: core.create_namespaced_pod(ns, o),
    }
    delete = {
        "Namespace": lambda n: core.delete_namespace(n),
        "NetworkPolicy": lambda n: networking.delete_namespaced_network_policy(n, ns),
        "Secret": lambda n: core.delete_namespaced_secret(n, ns),
        "ConfigMap": lambda n: core.delete_namespaced_config_map(n, ns),
        "Service": lambda n: core.delete_namespaced_service(n, ns, _preload_content=False),  # the client misreads the answer
        "Pod": lambda n: core.delete_namespaced_pod(n, ns, grace_period_seconds=0),
    }
    for obj in objects:
        create[obj["kind"]](obj)
        if obj["kind"] == "Pod":
            ready = (lambda p: p.status.phase == "Running") if obj["metadata"]["name"].endswith("-agent") else (
                lambda p: any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or []))
            wait(core, obj["metadata"]["name"], ns, ready)
    for obj in reversed(objects):
        delete[obj["kind"]](obj["metadata"]["name"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    binary = kube_apiserver.build(ROOT / "tests" / "support" / "kube-apiserver.sh")
    work = Path(tempfile.mkdtemp(prefix="bottle-bench-kube-"))
    server = kube_apiserver.start(binary, work / "apiserver")
    stop = threading.Event()
    try:
        os.environ["KUBECONFIG"] = str(server.kubeconfig)
        api = kubernetes.config.new_client_from_config(config_file=str(server.kubeconfig), persist_config=False)
        core = kubernetes.client.CoreV1Api(api)
        kube_apiserver.play_kubelet(core, None, stop)
        backend = KubernetesBackend()
        report = PreflightReport(backend="kubernetes", checks=[])
        times: dict[str, list[float]] = {"bottle": [], "bare": []}
        for round_ in range(args.rounds + 1):  # the first round warms both up and is not counted
            run_id = uuid.uuid4().hex[:8]
            state = StateStore(work / f"home-{run_id}")
            name = f"bench-{run_id}"
            started = time.perf_counter()
            plan = backend.up(manifest(name), docker=None, state=state, preflight=report, on_step=lambda s, d: None)
            backend.down(plan.slug, docker=None, state=state)
            bottle_seconds = time.perf_counter() - started
            other = manifest(f"bare-{run_id}")
            other_state = StateStore(work / f"bare-{run_id}")
            bare_plan = backend.prepare(other, docker=None, state=other_state, preflight=report)
            sidecar.write_secrets(other, bare_plan.bundle_dir, other_state)
            started = time.perf_counter()
            bare(api, core, bare_plan, other_state)
            bare_seconds = time.perf_counter() - started
            if round_:
                times["bottle"].append(bottle_seconds)
                times["bare"].append(bare_seconds)
        bottle_ms, bare_ms = (statistics.median(times[k]) * 1000 for k in ("bottle", "bare"))
        print(f"kubernetes up --detach + down, median of {args.rounds}: bare API calls {bare_ms:.0f} ms, "
              f"bottle {bottle_ms:.0f} ms: x{bottle_ms / bare_ms:.2f}")
    finally:
        stop.set()
        server.stop()


if __name__ == "__main__":
    main()
