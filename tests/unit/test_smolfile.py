import os
import stat
import tomllib
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bottle.backends.smolmachines import smolfile

BUNDLE = IPv4Address("192.168.38.2")

# What the manifest accepts as env: variable names, and any text without NUL as values.
env_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)
env_values = st.text(alphabet=st.characters(blacklist_characters="\0"), max_size=50)


GATEWAY = IPv4Address("192.168.38.1")
GUEST = Path("/home/u/.local/state/bottle/bottles/b/guest")
NETWORK = {
    "allow_cidrs": ["192.168.38.2/32"],
    "deny_cidrs": ["127.0.0.0/8", "169.254.0.0/16", "192.168.38.1/32", "::/0"],
}


def build(env):
    return smolfile.build(env, BUNDLE, GATEWAY, GUEST)


def test_renders_env_the_ca_mount_the_enforcing_backend_one_allowed_cidr_and_the_denies():
    rendered = smolfile.render(build({"TERM": "xterm", "A": 'say "hi"\\ \n ünï'}))
    assert rendered == (
        'env = [\n'
        '    "A=say \\"hi\\"\\\\ \\n ünï",\n'
        '    "TERM=xterm",\n'
        ']\n'
        'volumes = [\n'
        '    "/home/u/.local/state/bottle/bottles/b/guest:/etc/bottle:ro",\n'
        ']\n'
        'net_backend = "virtio-net"\n'
        '\n'
        '[network]\n'
        'allow_cidrs = [\n'
        '    "192.168.38.2/32",\n'
        ']\n'
        'deny_cidrs = [\n'
        '    "127.0.0.0/8",\n'
        '    "169.254.0.0/16",\n'
        '    "192.168.38.1/32",\n'
        '    "::/0",\n'
        ']\n'
    )


def test_an_empty_env_still_renders_the_allowlist():
    assert tomllib.loads(smolfile.render(build({}))) == {
        "env": [],
        "volumes": [f"{GUEST}:/etc/bottle:ro"],
        "net_backend": "virtio-net",
        "network": NETWORK,
    }


@given(st.dictionaries(env_names, env_values, max_size=8))
def test_any_env_round_trips_exactly(env):
    parsed = tomllib.loads(smolfile.render(build(env)))
    assert set(parsed) == {"env", "volumes", "net_backend", "network"}
    assert parsed["network"] == NETWORK
    assert dict(entry.split("=", 1) for entry in parsed["env"]) == env
    assert parsed["env"] == sorted(parsed["env"], key=lambda e: e.split("=", 1)[0])
