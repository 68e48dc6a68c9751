"""The Smolfile bottle hands smolvm: built as data, rendered with tomli-w, written 0600 by `prepare`.

smolvm parses Smolfiles with `deny_unknown_fields` at every level. bottle's holds the agent's `env`
(sorted `KEY=VALUE`), the one read-only mount (the bundle's CA certificate), the network backend that
enforces an allowlist (`virtio-net`; smolvm refuses an allowlist on TSI, which cannot enforce it), and
`[network]`: one allowed CIDR, the bundle's /32, and explicit denies for what must stay shut even if
an allow ever admitted it: the host's loopback reached through the VM's gateway, link-local and cloud
metadata addresses, the bottle's docker gateway (the host), and all of IPv6 (the bundle is IPv4).
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import tomli_w

from bottle.sidecar import GUEST_DIR
ALWAYS_DENIED = ("127.0.0.0/8", "169.254.0.0/16", "::/0")


def build(env: Mapping[str, str], bundle_ip: IPv4Address, gateway: IPv4Address, guest_dir: Path) -> dict[str, Any]:
    """The Smolfile as data."""
    return {
        "env": [f"{key}={value}" for key, value in sorted(env.items())],
        "volumes": [f"{guest_dir}:{GUEST_DIR}:ro"],
        "net_backend": "virtio-net",
        "network": {
            "allow_cidrs": [f"{bundle_ip}/32"],
            "deny_cidrs": [*ALWAYS_DENIED[:2], f"{gateway}/32", *ALWAYS_DENIED[2:]],
        },
    }


def render(smolfile: Mapping[str, Any]) -> str:
    return tomli_w.dumps(smolfile)
