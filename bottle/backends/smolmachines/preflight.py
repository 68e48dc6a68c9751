"""What smolmachines needs on this machine, and how to say what is missing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING

from bottle.backend import Check
from bottle.backends.smolmachines.smolvm import smolvm_environment

if TYPE_CHECKING:
    import docker

MIN_SMOLVM = (0, 8, 0)
INSTALL_SMOLVM = "install smolvm 0.8.0 or newer from https://github.com/smol-machines/smolvm and put it on PATH"
_VERSION = re.compile(r"^smolvm (\d+)\.(\d+)\.(\d+)\S*\s*$")


def check_smolvm(executable: str = "smolvm") -> tuple[Check, str | None]:
    """Find smolvm and parse `smolvm --version`; return the check and the version it saw."""
    path = shutil.which(executable)
    if path is None:
        return Check(name="smolvm", ok=False, detail=f"'{executable}' is not on PATH", fix=INSTALL_SMOLVM), None
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False,
                                env=smolvm_environment(os.environ))  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check(name="smolvm", ok=False, detail=f"'{path} --version' failed: {exc}", fix=INSTALL_SMOLVM), None
    match = _VERSION.match(result.stdout.strip())
    if result.returncode != 0 or not match:
        seen = (result.stdout or result.stderr).strip()[:80]
        detail = f"'{path} --version' printed {seen!r}, not 'smolvm X.Y.Z'"
        return Check(name="smolvm", ok=False, detail=detail, fix=INSTALL_SMOLVM), None
    version = ".".join(match.groups())
    if tuple(int(g) for g in match.groups()) < MIN_SMOLVM:
        return Check(name="smolvm", ok=False, detail=f"{path} is version {version}", fix=INSTALL_SMOLVM), version
    return Check(name="smolvm", ok=True, detail=f"{path} is version {version}"), version


def check_egress_floor() -> Check:
    """Later smolvm releases can deny every RFC 1918 address, which would cut a bottle off from its bundle."""
    floor = os.environ.get("SMOLVM_EGRESS_FLOOR", "")
    if floor.strip().lower() == "strict":
        return Check(
            name="egress floor",
            ok=False,
            detail="SMOLVM_EGRESS_FLOOR=strict denies private addresses, including the bottle's own bundle",
            fix="unset SMOLVM_EGRESS_FLOOR for bottle; the Smolfile's one /32 already confines the VM",
        )
    return Check(name="egress floor", ok=True, detail="SMOLVM_EGRESS_FLOOR is not strict")


def check_docker(client: docker.DockerClient | None) -> Check:
    fix = "start the Docker Engine and make sure this user can use it (DOCKER_HOST or /var/run/docker.sock)"
    if client is None:
        return Check(name="docker", ok=False, detail="no Docker Engine is reachable", fix=fix)
    try:
        version = client.version().get("Version", "unknown")
    except Exception as exc:  # any transport or API failure means the same thing to the user
        return Check(name="docker", ok=False, detail=f"the Docker Engine did not answer ({exc})", fix=fix)
    return Check(name="docker", ok=True, detail=f"Docker Engine {version} answers")


def check_platform(kvm: str = "/dev/kvm") -> Check:
    if sys.platform == "darwin":
        return Check(
            name="platform",
            ok=False,
            detail="Docker Desktop's container IPs are not routable from macOS, so the VM could not reach its bundle",
            fix="run bottle on a Linux host (smolmachines needs a routable docker bridge)",
        )
    if not sys.platform.startswith("linux"):
        return Check(name="platform", ok=False, detail=f"{sys.platform} is not supported", fix="use Linux")
    if not os.path.exists(kvm):
        return Check(
            name="kvm", ok=False, detail=f"{kvm} does not exist", fix="enable virtualization and load the kvm module"
        )
    if not os.access(kvm, os.R_OK | os.W_OK):
        return Check(
            name="kvm", ok=False, detail=f"{kvm} is not writable by this user", fix="add yourself to the 'kvm' group"
        )
    return Check(name="kvm", ok=True, detail=f"{kvm} is usable")
