import json
import stat
import subprocess
import sys
from pathlib import Path

import docker
import pytest

from bottle.backend import Check
from bottle.backends.smolmachines import preflight as checks
from bottle.cli import main
from bottle.testing import FakeDocker

EXAMPLE = str(Path(__file__).parents[2] / "examples" / "claude-code.toml")


@pytest.fixture
def fake(mocker):
    client = FakeDocker()
    mocker.patch("bottle.cli.docker_client", return_value=client)
    return client


@pytest.fixture
def ready_machine(real_smolvm, mocker):
    """A machine where preflight passes: the real smolvm of the smolmachines wheel and a usable KVM."""
    mocker.patch.object(checks, "check_platform", return_value=Check(name="kvm", ok=True, detail="fine"))
    mocker.patch("bottle.backends.smolmachines.host_routes", return_value=[])


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_prints_json_and_creates_nothing(capsys, fake, mocker):
    mocker.patch("bottle.backends.smolmachines.host_routes", return_value=[])
    code, out, err = run(capsys, "plan", "-f", EXAMPLE, "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["bundle_ip"] == "192.168.38.2" and plan["network_id"] is None
    assert [c.method for c in fake.engine.calls if c.method != "GET"] == []
    assert "bottle doctor" in err  # no smolvm here: the plan is shown, with a note


def test_plan_text_shows_every_field(capsys, fake):
    code, out, _ = run(capsys, "plan", "-f", EXAMPLE)
    assert code == 0
    assert "bundle_ip" in out and "machine_name           bottle-claude-code" in out
    assert "  HTTPS_PROXY=http://" in out


def test_prepare_saves_a_private_plan_and_prints_it(capsys, fake, ready_machine, real_smolvm, tmp_path):
    code, out, err = run(capsys, "prepare", "-f", EXAMPLE, "--json")
    assert code == 0, err
    saved = tmp_path / "bottle-home" / "bottles" / "claude-code" / "plan.json"
    assert json.loads(saved.read_text()) == json.loads(out)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(out)["smolvm_version"] == real_smolvm.version().split()[1]
    assert json.loads(out)["network_id"] in fake.engine.networks
    assert f"plan saved to {saved}" in err


def test_prepare_on_an_unready_machine_names_every_problem_and_creates_nothing(capsys, fake, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("sys.platform", "sunos5")
    networks = set(fake.engine.networks)
    code, out, err = run(capsys, "prepare", "-f", EXAMPLE)
    assert code == 1 and out == ""
    assert "no-smolvm-here: could not run" in err and "- platform: sunos5 is not supported" in err
    assert set(fake.engine.networks) == networks
    assert not (tmp_path / "bottle-home").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('name = "x"\n[agent]\nimage = "a"\ncolour = 1\n', "agent.colour: unknown key; allowed here: command, env, image"),
        ('name = "x"\n[agent]\nimage = "a"\nenv = { GH_TOKEN = "ghp_x" }\n', "looks like a credential"),
        ('name = "x"\nbackend = "qemu"\n[agent]\nimage = "a"\n', "unknown backend 'qemu'; installed backends: docker, kubernetes, smolm"),
        ("name = ", "not valid TOML"),
        ('name = "x"\nbad = ' + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply to be a bottle manifest"),
        ('name = "x"\na = ' + "{b = " * 3000 + "1" + "}" * 3000 + "\n", "nested too deeply to be a bottle manifest"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, fake, tmp_path, content, message):
    manifest = tmp_path / "bottle.toml"
    manifest.write_text(content)
    code, out, err = run(capsys, "plan", "-f", str(manifest))
    assert code == 2 and out == ""
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "ghp_x" not in err


def test_a_missing_manifest_says_how_to_start(capsys, fake, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "prepare")
    assert code == 2
    assert err == "bottle: bottle.toml: no such file; pass -f PATH or start from examples/claude-code.toml\n"


def test_an_unreachable_docker_is_an_environment_problem(capsys, mocker):
    mocker.patch("bottle.cli.docker.from_env", side_effect=docker.errors.DockerException("connection refused"))
    code, _, err = run(capsys, "plan", "-f", EXAMPLE)
    assert code == 1
    assert err.startswith("bottle: no Docker Engine is reachable (connection refused)")


def test_unexpected_errors_are_one_line_unless_debug(capsys, fake, mocker):
    mocker.patch("bottle.cli.StateStore", side_effect=RuntimeError("boom"))
    code, _, err = run(capsys, "plan", "-f", EXAMPLE)
    assert code == 1 and err.startswith("bottle: internal error: RuntimeError('boom')") and "Traceback" not in err
    code, _, err = run(capsys, "--debug", "plan", "-f", EXAMPLE)
    assert code == 1 and "Traceback" in err


def test_backends_lists_bottles_own(capsys):
    code, out, _ = run(capsys, "backends")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("docker  bottle.backends.docker:DockerBackend  (bottle ")
    assert lines[1].startswith("kubernetes  bottle.backends.kubernetes:KubernetesBackend  (bottle ")
    assert lines[2].startswith("smolmachines  bottle.backends.smolmachines:SmolmachinesBackend  (bottle ")


def test_doctor_reports_and_exits_1_when_something_is_missing(capsys, fake, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    code, out, _ = run(capsys, "doctor")
    assert code == 1
    assert "smolmachines:\n  FAIL smolvm: " in out and "no-smolvm-here: could not run" in out
    assert "       fix: pip install 'bottle[smolvm]'" in out
    assert "  ok   docker: Docker Engine 20.10.24 answers" in out


def test_doctor_exits_0_on_a_ready_machine(capsys, fake, ready_machine):
    code, out, _ = run(capsys, "doctor", "docker", "smolmachines")  # no cluster here for kubernetes
    assert code == 0, out
    assert "FAIL" not in out


def test_python_dash_m_bottle_runs_the_same_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bottle", "plan", "-f", str(tmp_path / "none.toml")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().endswith("none.toml: no such file; pass -f PATH or start from examples/claude-code.toml")


def test_up_on_an_unready_machine_names_every_problem_and_creates_nothing(capsys, fake, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    networks = set(fake.engine.networks)
    code, _, err = run(capsys, "up", "-f", EXAMPLE, "--detach")
    assert code == 1 and "no-smolvm-here: could not run" in err
    assert set(fake.engine.networks) == networks
    assert not (tmp_path / "bottle-home").exists()


def test_down_of_something_that_is_not_a_name_is_bad_input(capsys, fake):
    code, out, err = run(capsys, "down", "!!!")
    assert (code, out) == (2, "")
    assert err == "bottle: '!!!' is not a bottle name: it must contain at least one ASCII letter or digit\n"


def test_ls_and_gc_on_a_machine_with_no_bottles(capsys, fake, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no smolvm either: there can be no machines
    assert run(capsys, "ls")[:2] == (0, "no bottles\n")
    assert run(capsys, "ls", "--json")[:2] == (0, "[]\n")
    assert run(capsys, "gc", "--dry-run")[:2] == (0, "nothing to collect\n")


def test_dns_audit_lines_read_as_dns_in_bottle_logs():
    from bottle.cli import _format_audit

    line = {"time": "t", "event": "dns", "decision": "refused", "name": "c2VjcmV0.evil.example", "qtype": 16,
            "client": "192.168.38.1"}  # fmt: skip
    assert _format_audit(line) == "t  REFUSED  DNS c2VjcmV0.evil.example (type 16)  from 192.168.38.1"
    dropped = {"time": "t", "event": "dns", "decision": "dropped", "reason": "not a query", "client": "10.0.0.3"}
    assert _format_audit(dropped) == "t  DROPPED  DNS not a query  from 10.0.0.3"


def test_an_error_never_sends_escape_sequences_to_the_terminal(capsys):
    code, out, err = run(capsys, "plan", "-f", "\x1b]0;PWNED\x07\x1b[2J.toml")
    assert code == 2 and "no such file" in err
    assert "\x1b" not in err and "\x07" not in err and "\\x1b]0;PWNED\\x07" in err
