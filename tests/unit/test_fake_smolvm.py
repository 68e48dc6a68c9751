"""The fake smolvm must be as strict as smolvm 0.8.0, or a launcher could pass here and fail for real."""

import json
from ipaddress import IPv4Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bottle.backends.smolmachines import smolfile
from bottle.testing import fake_smolvm


@pytest.fixture
def smolvm(tmp_path, monkeypatch, capsys):
    """Run the fake in-process: returns (exit code, stdout, stderr)."""
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv(fake_smolvm.STATE_ENV, str(state))

    def run(*argv: str):
        try:
            code = fake_smolvm.main(list(argv))
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    run.state = state
    return run


@pytest.fixture
def artifact(smolvm, tmp_path):
    path = tmp_path / "agent.smolmachine"
    assert smolvm("pack", "create", "--image", "node:22", "--output", str(path))[0] == 0
    return path


def write(tmp_path, text: str):
    path = tmp_path / "Smolfile"
    path.write_text(text)
    return str(path)


def test_version(smolvm, monkeypatch):
    assert smolvm("--version") == (0, "smolvm 0.8.0\n", "")
    monkeypatch.setenv("SMOLVM_FAKE_VERSION", "0.7.1")
    assert smolvm("--version")[1] == "smolvm 0.7.1\n"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('name = "x"\n', "unknown field `name`"),
        ('command = ["x"]\n', "unknown field `command`"),
        ('[[net]]\nattachment = "x"\n', "invalid type for `net`, expected boolean"),
        ("[network]\noutbound_localhost_only = true\n", "unknown field `outbound_localhost_only`"),
        ("[dev]\nsocket = 1\n", "unknown field `socket`"),
        ('env = "A=1"\n', "invalid type for `env`, expected array of strings"),
        ("cpus = 256\n", "invalid type for `cpus`"),
        ('[network]\nallow_cidrs = ["banana"]\n', "invalid CIDR 'banana'"),
        ("[network]\nallow_cidrs = [1]\n", "invalid type for `network.allow_cidrs`"),
        ('env = ["NOEQUALS"]\n', "expected KEY=VALUE"),
        ("env = [\n", "failed to parse"),
    ],
)
def test_a_bad_smolfile_is_refused(smolvm, tmp_path, text, error):
    code, _, err = smolvm("machine", "create", "m", "--image", "x", "--smolfile", write(tmp_path, text))
    assert code == 1 and error in err and err.startswith("Error: ")
    assert fake_smolvm.machines(smolvm.state) == {}


def test_bottles_smolfile_shape_is_accepted(smolvm, tmp_path):
    data = smolfile.build({"A": "1"}, IPv4Address("192.168.38.2"))
    code, _, err = smolvm("machine", "create", "m", "-I", "x", "-s", write(tmp_path, smolfile.render(data)))
    assert code == 0, err
    assert fake_smolvm.machines(smolvm.state)["m"]["allow_cidrs"] == ["192.168.38.2/32"]
    assert fake_smolvm.machines(smolvm.state)["m"]["network"] is True  # allow_cidrs implies net


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["machine", "create", "m", "--from", "{a}", "--smolfile", "{s}"], "'--from <FROM>' cannot be used with"),
        (["machine", "create", "m", "--from", "{a}", "--image", "x"], "'--from <FROM>' cannot be used with"),
        (["pack", "create", "-I", "x", "--from-vm", "m", "-o", "out"], "cannot be used with"),
        (["machine", "create", "m", "--colour", "red"], "unexpected argument '--colour' found"),
        (["machine", "create", "m", "--allow-cidr", "banana"], "invalid CIDR 'banana'"),
        (["machine", "create", "m", "-e", "NOEQUALS"], "expected KEY=VALUE"),
        (["machine", "start", "m"], "unexpected argument 'm' found"),  # start takes --name, not a position
        (["machine", "delete", "--name", "m"], "error:"),  # delete takes a position, not --name
        (["machine", "crate", "m"], "error:"),
        (["machine", "create", "m", "--all"], "unexpected argument '--all' found"),  # no prefix matching
    ],
)
def test_usage_errors_exit_2_like_clap(smolvm, tmp_path, artifact, argv, error):
    argv = [a.format(a=artifact, s=write(tmp_path, "")) for a in argv]
    code, _, err = smolvm(*argv)
    assert code == 2 and error in err
    assert fake_smolvm.machines(smolvm.state) == {}


def test_existing_and_missing_machines_use_smolvms_words(smolvm, artifact):
    assert smolvm("machine", "create", "m", "--from", str(artifact))[0] == 0
    code, _, err = smolvm("machine", "create", "m", "--from", str(artifact))
    assert code == 1
    assert err == (
        "Error: a machine named 'm' already exists. Use 'machine start --name m' to start it, "
        "or 'machine delete m -f' to remove it.\n"
    )
    for argv in (["machine", "start", "--name", "x"], ["machine", "delete", "x", "-f"], ["machine", "status", "-n", "x"]):
        assert smolvm(*argv)[:3:2] == (1, "Error: vm not found: x\n")


def test_create_from_something_that_is_not_an_artifact_fails(smolvm, tmp_path):
    code, _, err = smolvm("machine", "create", "m", "--from", write(tmp_path, "junk"))
    assert code == 1 and "not a .smolmachine file" in err


def test_ls_json_reflects_what_was_created_started_and_deleted(smolvm, artifact):
    assert smolvm("machine", "ls", "--json")[1] == "[]\n"
    smolvm("machine", "create", "m", "--from", str(artifact), "--allow-cidr", "10.1.2.3/32")
    assert [(m["name"], m["state"], m["network"]) for m in json.loads(smolvm("machine", "ls", "--json")[1])] == [
        ("m", "created", True)
    ]
    smolvm("machine", "start", "--name", "m")
    assert json.loads(smolvm("machine", "list", "--json")[1])[0]["state"] == "running"
    code, _, err = smolvm("machine", "delete", "m")
    assert code == 1 and "use -f" in err
    assert smolvm("machine", "delete", "m", "-f")[0] == 0
    assert json.loads(smolvm("machine", "ls", "--json")[1]) == []


def test_exec_needs_a_running_machine_and_a_command(smolvm, artifact):
    smolvm("machine", "create", "m", "--from", str(artifact))
    assert smolvm("machine", "exec", "--name", "m", "--", "true")[2] == "Error: invalid vm state: expected running, got created\n"
    smolvm("machine", "start", "--name", "m")
    assert smolvm("machine", "exec", "--name", "m", "-it", "--", "claude")[0] == 0
    assert smolvm("machine", "exec", "--name", "m")[0] == 2


def test_failure_injection_and_call_recording(smolvm, artifact, monkeypatch):
    monkeypatch.setenv("SMOLVM_FAKE_FAIL", "machine-create")
    code, _, err = smolvm("machine", "create", "m", "--from", str(artifact))
    assert code == 1 and "injected" in err
    assert fake_smolvm.machines(smolvm.state) == {}
    assert fake_smolvm.calls(smolvm.state)[-1] == ["machine", "create", "m", "--from", str(artifact)]


env_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)
env_values = st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(env=st.dictionaries(env_names, env_values, max_size=6))
def test_create_flags_carry_exactly_what_the_smolfile_carries(smolvm, artifact, tmp_path, env):
    """The launcher's --from + flags and a --smolfile create give smolvm the same env and allowlist."""
    data = smolfile.build(env, IPv4Address("192.168.38.2"))
    for name in ("by-file", "by-flags"):
        smolvm("machine", "delete", name, "-f")
    assert smolvm("machine", "create", "by-file", "-I", "x", "-s", write(tmp_path, smolfile.render(data)))[0] == 0
    assert smolvm("machine", "create", "by-flags", "--from", str(artifact), *smolfile.flags(data))[0] == 0
    made = fake_smolvm.machines(smolvm.state)
    assert made["by-flags"]["env"] == made["by-file"]["env"] == data["env"]
    assert made["by-flags"]["allow_cidrs"] == made["by-file"]["allow_cidrs"] == ["192.168.38.2/32"]
