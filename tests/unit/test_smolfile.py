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


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_written_file_is_private_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = tmp_path / "Smolfile"
        smolfile.write(path, smolfile.build({"A": "1"}, BUNDLE))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_the_file_is_never_readable_by_others_while_being_written(tmp_path, mocker):
    seen = []
    real_fdopen = os.fdopen

    def spy(fd, *args, **kwargs):
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_fdopen(fd, *args, **kwargs)

    mocker.patch("bottle.state.os.fdopen", side_effect=spy)
    old = os.umask(0)
    try:
        smolfile.write(tmp_path / "Smolfile", smolfile.build({}, BUNDLE))
    finally:
        os.umask(old)
    assert seen == [0o600]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, mocker):
    path = tmp_path / "Smolfile"
    smolfile.write(path, smolfile.build({"A": "old"}, BUNDLE))
    mocker.patch("bottle.state.os.replace", side_effect=OSError("disk full"))
    with pytest.raises(OSError):
        smolfile.write(path, smolfile.build({"A": "new"}, BUNDLE))
    assert "A=old" in path.read_text()
    assert list(tmp_path.iterdir()) == [path]
