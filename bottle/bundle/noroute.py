"""Two one-shot jobs the docker backend runs from the bundle image to keep the agent off the host.

`noroute`: remove every IPv4 default route from the network namespace this runs in, then exit 0 (1 if
one stays).

The docker backend runs it once from the bundle image, as a short-lived container that joins the agent
container's network namespace with CAP_NET_ADMIN alone: docker gives every container on a network,
even an internal one, a default route through a gateway nobody holds, and with that route the agent
can send UDP to 255.255.255.255, which the host's own stack receives on the bridge. Without it, the
agent reaches its own /24 (the bundle) and nothing else: not even a broadcast has a route.

Plain netlink (RTM_DELROUTE), since the bundle image has Python and not iproute2.

`rpfilter IFACE`: turn on reverse-path filtering for the agent's bridge in the host's network namespace
(run with the host's network and CAP_NET_ADMIN, /proc/sys left writable by `systempaths=unconfined`). A
socket that names its interface (SO_BINDTODEVICE, IP_UNICAST_IF, IP_PKTINFO: no capability needed)
sends from the agent without any route, to 255.255.255.255, to multicast, or to any of the host's
addresses, and the host's stack takes it off the bridge. The bridge has no IPv4 address (the network is
made with inhibit_ipv4), so with rp_filter on, the kernel finds no valid path back to any source there
and drops every packet the agent sends to the host, whatever the mode `all` is set to. Frames between
the agent and the bundle are bridged, never routed, and are not touched. IPv6 is switched off on the
bridge too, so the host has no link-local address there.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import struct
import sys
from pathlib import Path

RTM_DELROUTE = 25
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
RT_TABLE_MAIN, RT_SCOPE_NOWHERE = 254, 255


def default_routes(table: Path = Path("/proc/net/route")) -> int:
    """How many IPv4 default routes the namespace has."""
    return sum(1 for line in table.read_text().splitlines()[1:] if line.split()[1:2] == ["00000000"])


def delete_default_route(sock: socket.socket, seq: int) -> int:
    """Ask the kernel to delete one IPv4 default route; 0 on success, else the errno it answered."""
    rtmsg = struct.pack("BBBBBBBBI", socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, 0, RT_SCOPE_NOWHERE, 0, 0)
    header = struct.pack("=IHHII", 16 + len(rtmsg), RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, seq, 0)
    sock.send(header + rtmsg)
    reply = sock.recv(65536)
    kind = struct.unpack_from("=H", reply, 4)[0]
    return -struct.unpack_from("=i", reply, 16)[0] if kind == NLMSG_ERROR else 0


def rp_filter(interface: str, proc: Path = Path("/proc/sys/net")) -> str | None:
    """Set strict reverse-path filtering on `interface`, and switch IPv6 off there (no link-local
    address of the host's on the agent's bridge either); None if both hold, else why not."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", interface):
        return f"{interface!r} is not an interface name"
    for setting in (proc / "ipv4" / "conf" / interface / "rp_filter", proc / "ipv6" / "conf" / interface / "disable_ipv6"):
        try:
            setting.write_text("1\n")
            if setting.read_text().strip() != "1":
                return f"{setting} did not keep 1"
        except OSError as exc:
            return f"cannot set {setting}: {exc.strerror}"
    return None


def rp_filter_main(interface: str) -> int:
    problem = rp_filter(interface)
    if problem:
        print(f"bottle-rpfilter: {problem}", file=sys.stderr)
    return 1 if problem else 0


def main() -> int:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        for seq in range(1, 17):
            answer = delete_default_route(sock, seq)
            if answer == errno.ESRCH:  # none left
                break
            if answer != 0:
                print(f"bottle-noroute: cannot delete the default route: {os.strerror(answer)}", file=sys.stderr)
                return 1
    left = default_routes()
    if left:
        print(f"bottle-noroute: {left} default route(s) remain", file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
