"""The confinement probe: proof, at every `up`, that the new VM reaches its bundle and nothing else tried.

Inside the VM a small shell script connects to the bundle's proxy port, which must open, and to a
listener bottle opens for the probe on the bottle's docker gateway (an address on the host that the
allowlist must refuse), which must not, over TCP and (where the image has bash) UDP. The listener, not
the script, is the judge of the second: if it sees any connection or datagram, the VM got out,
whatever the script says.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from bottle.backends.smolmachines.plan import SmolmachinesBottlePlan
from bottle.sidecar import PROXY_PORT
from bottle.backends.smolmachines.smolvm import Smolvm
from bottle.errors import StepFailed

STEP = "probe"
NO_TOOL = 3
# Arguments: bundle address, bundle port, decoy address, decoy port. One line per target: NAME=open|shut.
# Uses the first of curl, nc, bash or wget the agent image has; a connection counts as open, and so does
# any failure the tool does not name as refused or timed out (a probe that cannot tell fails closed).
SCRIPT = r"""
reach() {
  if command -v curl >/dev/null 2>&1; then
    curl -s -o /dev/null --noproxy '*' --connect-timeout 3 --max-time 5 "http://$1:$2/"
    code=$?; [ "$code" -ne 7 ] && [ "$code" -ne 28 ]
  elif command -v nc >/dev/null 2>&1; then
    nc -w 3 "$1" "$2" </dev/null >/dev/null 2>&1
  elif command -v bash >/dev/null 2>&1; then
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' probe "$1" "$2" 2>/dev/null
  elif command -v wget >/dev/null 2>&1; then
    said=$(wget -q -T 3 -O /dev/null "http://$1:$2/" 2>&1)
    [ $? -eq 0 ] || ! printf '%s' "$said" | grep -qiE 'refused|timed out|unreachable|no route|download timed'
  else
    echo "no tool"; exit 3
  fi
}
if reach "$1" "$2"; then echo bundle=open; else echo bundle=shut; fi
if reach "$3" "$4"; then echo decoy=open; else echo decoy=shut; fi
# UDP too, where the image can send it; only the listener can tell whether a datagram got out.
if command -v bash >/dev/null 2>&1; then
  timeout 3 bash -c 'echo bottle-probe >"/dev/udp/$1/$2"' probe "$3" "$4" 2>/dev/null
fi
sleep 1
"""


@contextmanager
def listener(address: str) -> Iterator[tuple[int, list[str]]]:
    """A TCP and a UDP listener on `address`, one free port; yields the port and every peer that got there."""
    seen: list[str] = []
    for _ in range(20):
        tcp, udp = socket.socket(socket.AF_INET, socket.SOCK_STREAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp.bind((address, 0))
        try:
            udp.bind((address, tcp.getsockname()[1]))
            break
        except OSError:  # that port is taken for UDP: try another
            tcp.close()
            udp.close()
    else:
        raise StepFailed(STEP, f"found no port free for both TCP and UDP on {address} for the probe's listener")
    tcp.listen(8)
    for sock in (tcp, udp):
        sock.settimeout(0.1)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                peer, where = tcp.accept()
                peer.close()
                seen.append(f"{where[0]} (TCP)")
            except OSError:
                pass
            try:
                seen.append(f"{udp.recvfrom(512)[1][0]} (UDP)")
            except OSError:
                pass

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield tcp.getsockname()[1], seen
    finally:
        stop.set()
        thread.join()
        tcp.close()
        udp.close()


def confined(smolvm: Smolvm, plan: SmolmachinesBottlePlan, *, timeout: float) -> None:
    """Run the probe in the machine; raise StepFailed unless the bundle opens and the decoy does not."""
    decoy = str(plan.bundle_gateway)
    with listener(decoy) as (port, seen):
        args = [str(plan.bundle_ip), str(PROXY_PORT), decoy, str(port)]
        result = smolvm.exec(STEP, plan.machine_name, ["sh", "-c", SCRIPT, "probe", *args], timeout=timeout)
    said = dict(line.split("=", 1) for line in result.stdout.splitlines() if line.count("=") == 1)
    if seen or said.get("decoy") == "open":
        how = f" (the listener saw {', '.join(seen)})" if seen else ""
        raise StepFailed(STEP, f"the VM reached {decoy}:{port}{how}, which its allowlist must refuse: it is not "
                               "confined")  # fmt: skip
    if result.returncode == NO_TOOL and "no tool" in result.stdout:
        raise StepFailed(STEP, "the agent image has none of curl, nc, bash or wget, so bottle cannot probe its VM")
    if result.returncode != 0 or said.get("bundle") != "open":
        why = (result.stderr or result.stdout).strip().splitlines()
        detail = why[-1][:200] if why else f"exit {result.returncode}"
        raise StepFailed(STEP, f"the VM cannot reach its bundle at {plan.bundle_ip}:{PROXY_PORT} ({detail})")
