"""Talking to a running bottle's Pods: the user's terminal on the agent, a command in it, the bundle's log.

All three go through the API server (attach, exec and log are Pod subresources), so they work wherever
the kubeconfig does, with no route to the Pods themselves.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import sys
import termios
import tty as terminal
from collections.abc import Iterator
from typing import Any

from kubernetes.client.rest import ApiException
from kubernetes.stream import stream

from bottle.backends.kubernetes.cluster import Cluster, refusal
from bottle.backends.kubernetes.plan import KubernetesBottlePlan
from bottle.backends.kubernetes.render import AGENT, BUNDLE
from bottle.errors import BottleError

RESIZE = 4  # the channel a terminal's size goes to


def pod_name(plan: KubernetesBottlePlan, role: str) -> str:
    return next(o["metadata"]["name"] for o in plan.objects if o["kind"] == "Pod" and o["metadata"]["labels"]
                ["bottle.role"] == role)  # fmt: skip


@contextlib.contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    """The user's terminal in raw mode for as long as they are attached (keys go to the agent as typed)."""
    if not enabled:
        yield
        return
    saved = termios.tcgetattr(sys.stdin.fileno())
    try:
        terminal.setraw(sys.stdin.fileno())
        yield
    finally:
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


def _exit_code(cluster: Cluster, plan: KubernetesBottlePlan, name: str) -> int:
    pod = cluster.read("Pod", name, plan.namespace) or {}
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if status.get("name") == AGENT and terminated:
            return int(terminated.get("exitCode", 1))
    return 0  # still running: the user left it, as `up --detach` would


def attach(cluster: Cluster, plan: KubernetesBottlePlan, *, tty: bool) -> int:
    """Attach the user's terminal to the agent's Pod (its command was started with a terminal of its own)."""
    name = pod_name(plan, AGENT)
    try:
        channel = stream(cluster.core.connect_get_namespaced_pod_attach, name, plan.namespace, container=AGENT,
                         stdin=True, stdout=True, stderr=True, tty=tty, _preload_content=False)  # fmt: skip
    except ApiException as exc:
        raise BottleError(f"cannot attach to Pod {name}: {refusal(exc)}") from None

    def resize(*_: Any) -> None:
        size = shutil.get_terminal_size()
        channel.write_channel(RESIZE, json.dumps({"Width": size.columns, "Height": size.lines}))

    previous = signal.signal(signal.SIGWINCH, resize) if tty else None
    try:
        with raw_terminal(tty):
            if tty:
                resize()
            while channel.is_open():
                channel.update(timeout=0.05)
                for read, out in ((channel.read_stdout, sys.stdout), (channel.read_stderr, sys.stderr)):
                    data = read(timeout=0)
                    if data:
                        out.write(data)
                        out.flush()
                ready, _, _ = select.select([sys.stdin], [], [], 0)
                if ready:
                    data = os.read(sys.stdin.fileno(), 4096)
                    if not data:
                        break
                    channel.write_stdin(data.decode(errors="replace"))
    finally:
        channel.close()
        if previous is not None:
            signal.signal(signal.SIGWINCH, previous)
    return _exit_code(cluster, plan, name)


def run(cluster: Cluster, plan: KubernetesBottlePlan, command: list[str], timeout: float) -> tuple[int, str]:
    """Run `command` in the agent's container, without a terminal; its exit code and output."""
    name = pod_name(plan, AGENT)
    try:
        channel = stream(cluster.core.connect_get_namespaced_pod_exec, name, plan.namespace, container=AGENT,
                         command=command, stdin=False, stdout=True, stderr=True, tty=False,
                         _preload_content=False)  # fmt: skip
    except ApiException as exc:
        raise BottleError(f"cannot run a command in Pod {name}: {refusal(exc)}") from None
    channel.run_forever(timeout=timeout)
    output = channel.read_stdout() + channel.read_stderr()
    if channel.is_open():
        channel.close()
        return 124, output  # as timeout(1) says it
    return channel.returncode or 0, output


def bundle_log(cluster: Cluster, plan: KubernetesBottlePlan, *, follow: bool) -> Iterator[bytes]:
    """The bundle Pod's stdout: its audit log, one JSON line per request."""
    name = pod_name(plan, BUNDLE)
    try:
        response = cluster.core.read_namespaced_pod_log(name, plan.namespace, container=BUNDLE, follow=follow,
                                                        _preload_content=False)  # fmt: skip
    except ApiException as exc:
        raise BottleError(f"cannot read the log of Pod {name}: {refusal(exc)}") from None
    yield from response.stream(65536)
