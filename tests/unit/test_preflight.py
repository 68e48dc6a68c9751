import os

import pytest

from bottle.backends.smolmachines import SmolmachinesBackend
from bottle.backends.smolmachines import preflight as checks
from bottle.errors import PreflightFailed
from bottle.testing import FakeDocker


@pytest.fixture
def smolvm_prints(tmp_path, monkeypatch):
    """Put an executable `smolvm` on PATH that prints `output` and exits with `code` for --version."""

    def install(output: str, code: int = 0):
        script = tmp_path / "bin" / "smolvm"
        script.parent.mkdir(exist_ok=True)
        script.write_text(f"#!/bin/sh\nprintf '%s\\n' '{output}'\nexit {code}\n")
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}/usr/bin:/bin")

    return install


@pytest.mark.parametrize("output", ["smolvm 0.8.0", "smolvm 0.8.3", "smolvm 1.9.2", "smolvm 0.10.0-rc.1"])
def test_smolvm_at_or_above_0_8_passes_and_its_version_is_recorded(smolvm_prints, output):
    smolvm_prints(output)
    check, version = checks.check_smolvm()
    assert check.ok, check.detail
    assert version == output.split()[1].split("-")[0]


@pytest.mark.parametrize("output", ["smolvm 0.7.9", "smolvm 0.1.0"])
def test_older_smolvm_fails_with_how_to_fix(smolvm_prints, output):
    smolvm_prints(output)
    check, version = checks.check_smolvm()
    assert not check.ok
    assert "0.8.0 or newer" in check.fix
    assert version == output.split()[1]


@pytest.mark.parametrize(("output", "code"), [("krunvm 0.8.0", 0), ("smolvm 0.8.0", 3), ("", 0)])
def test_unparsable_or_failing_version_output_fails(smolvm_prints, output, code):
    smolvm_prints(output, code)
    check, version = checks.check_smolvm()
    assert not check.ok and version is None
    assert "not 'smolvm X.Y.Z'" in check.detail


def test_missing_smolvm_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    check, version = checks.check_smolvm()
    assert (check.ok, version) == (False, None)
    assert check.detail == "'smolvm' is not on PATH"


def test_strict_egress_floor_is_explained(monkeypatch):
    assert checks.check_egress_floor().ok
    monkeypatch.setenv("SMOLVM_EGRESS_FLOOR", "strict")
    check = checks.check_egress_floor()
    assert not check.ok and "bundle" in check.detail and "unset SMOLVM_EGRESS_FLOOR" in check.fix


def test_docker_check(mocker):
    assert checks.check_docker(FakeDocker()).detail == "Docker Engine 20.10.24 answers"
    assert not checks.check_docker(None).ok
    broken = FakeDocker()
    mocker.patch.object(broken, "version", side_effect=ConnectionError("refused"))
    assert "did not answer (refused)" in checks.check_docker(broken).detail


def test_kvm_must_exist_and_be_writable(tmp_path, mocker):
    mocker.patch.object(checks.sys, "platform", "linux")
    assert checks.check_platform(str(tmp_path / "kvm")).detail.endswith("does not exist")
    device = tmp_path / "kvm"
    device.write_text("")
    device.chmod(0o600)
    assert checks.check_platform(str(device)).ok
    mocker.patch.object(checks.os, "access", return_value=False)
    assert "not writable" in checks.check_platform(str(device)).detail


def test_macos_is_told_plainly_why_it_cannot_work(mocker):
    mocker.patch.object(checks.sys, "platform", "darwin")
    check = checks.check_platform()
    assert not check.ok and "not routable" in check.detail


def test_every_missing_piece_is_reported_at_once(monkeypatch, tmp_path, mocker):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("SMOLVM_EGRESS_FLOOR", "strict")
    mocker.patch.object(checks.sys, "platform", "linux")
    mocker.patch.object(checks.os.path, "exists", return_value=False)
    report = SmolmachinesBackend(routes=[]).preflight(docker=None)
    assert not report.ok
    assert [p.split(":")[0] for p in report.problems] == ["smolvm", "egress floor", "docker", "kvm"]
    message = str(PreflightFailed("smolmachines", report.problems))
    assert message.count("\n  - ") == 4
