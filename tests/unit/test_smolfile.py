import os
import stat
import tomllib
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bottle.backends.smolmachines import smolfile

BUNDLE = IPv4Address("192.168.38.2")

# What the manifest accepts as env: variable names, and any text without NUL as values.
env_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)
env_values = st.text(alphabet=st.characters(blacklist_characters="\0"), max_size=50)


def test_renders_exactly_env_and_one_allowed_cidr():
    rendered = smolfile.render(smolfile.build({"TERM": "xterm", "A": 'say "hi"\\ \n ünï'}, BUNDLE))
    assert rendered == (
        'env = [\n'
        '    "A=say \\"hi\\"\\\\ \\n ünï",\n'
        '    "TERM=xterm",\n'
        ']\n'
        '\n'
        '[network]\n'
        'allow_cidrs = [\n'
        '    "192.168.38.2/32",\n'
        ']\n'
    )


def test_an_empty_env_still_renders_the_allowlist():
    assert tomllib.loads(smolfile.render(smolfile.build({}, BUNDLE))) == {
        "env": [],
        "network": {"allow_cidrs": ["192.168.38.2/32"]},
    }


@given(st.dictionaries(env_names, env_values, max_size=8))
def test_any_env_round_trips_exactly(env):
    parsed = tomllib.loads(smolfile.render(smolfile.build(env, BUNDLE)))
    assert set(parsed) == {"env", "network"}
    assert parsed["network"] == {"allow_cidrs": ["192.168.38.2/32"]}
    assert dict(entry.split("=", 1) for entry in parsed["env"]) == env
    assert parsed["env"] == sorted(parsed["env"], key=lambda e: e.split("=", 1)[0])
