"""The Smolfile bottle hands smolvm: built as data, rendered with tomli-w, written 0600.

smolvm 0.8.0 parses Smolfiles with `deny_unknown_fields`; bottle's holds exactly two things, the agent's
`env` (sorted `KEY=VALUE`) and `[network] allow_cidrs = ["<bundle-ip>/32"]`, nothing else. `prepare`
writes it with `StateStore.write_private`.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Address
from typing import Any

import tomli_w


def build(env: Mapping[str, str], bundle_ip: IPv4Address) -> dict[str, Any]:
    """The Smolfile as data: the env and a one-entry allowlist, the bundle's /32."""
    return {
        "env": [f"{key}={value}" for key, value in sorted(env.items())],
        "network": {"allow_cidrs": [f"{bundle_ip}/32"]},
    }


def render(smolfile: Mapping[str, Any]) -> str:
    return tomli_w.dumps(smolfile)


def flags(smolfile: Mapping[str, Any]) -> list[str]:
    """The `smolvm machine create` flags that carry exactly the Smolfile's env and allowlist.

    smolvm refuses `--from ARTIFACT` together with `--smolfile`, so a machine created from a packed
    artifact gets the same data as flags; both come from this one dict, so they cannot drift apart.
    """
    env = [arg for entry in smolfile["env"] for arg in ("-e", entry)]
    cidrs = [arg for cidr in smolfile["network"]["allow_cidrs"] for arg in ("--allow-cidr", cidr)]
    return env + cidrs
