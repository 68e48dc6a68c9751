"""What smolmachines needs on this machine, and how to say what is missing."""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING

from bottle.backend import Check
from bottle.backends.smolmachines.smolvm import Smolvm, dropped_settings
from bottle.errors import StepFailed

if TYPE_CHECKING:
    import docker

# The releases bottle drives (floor included, ceiling excluded). The floor, 1.31.0, is the first that
# takes everything bottle's confinement needs: a Smolfile beside a `docker save` archive, labels, error
# codes, `net_backend = "virtio-net"` (the backend that enforces the allowlist) and `deny_cidrs`. The
# ceiling is the next minor after the newest release bottle was tried against.
SUPPORTED = ((1, 31, 0), (1, 33, 0))
SUPPORTED_TEXT = "1.31.0 up to 1.32.x"
INSTALL_SMOLVM = (
    "pip install 'bottle[smolvm]' (the smolmachines wheel carries smolvm), or put smolvm 1.31 or 1.32 on PATH; "
    "$BOTTLE_SMOLVM names one explicitly"
)
_VERSION = re.compile(r"^smolvm (\d+)\.(\d+)\.(\d+)\S*$")


def parse_version(text: str) -> tuple[int, int, int] | None:
    match = _VERSION.match(text.strip())
    return tuple(int(g) for g in match.groups()) if match else None  # type: ignore[return-value]


def check_smolvm(smolvm: Smolvm | None) -> tuple[Check, str | None]:
    """Find smolvm and check its version is one bottle supports; return the check and the version."""
    if smolvm is None:
        detail = "no smolvm: none on PATH, $BOTTLE_SMOLVM unset, and the smolmachines wheel is not installed"
        return Check(name="smolvm", ok=False, detail=detail, fix=INSTALL_SMOLVM), None
    try:
        said = smolvm.version()
    except StepFailed as exc:
        return Check(name="smolvm", ok=False, detail=f"{smolvm.executable}: {exc.reason}", fix=INSTALL_SMOLVM), None
    version = parse_version(said)
    if version is None:
        detail = f"'{smolvm.executable} --version' printed {said[:80]!r}, not 'smolvm X.Y.Z'"
        return Check(name="smolvm", ok=False, detail=detail, fix=INSTALL_SMOLVM), None
    shown = ".".join(map(str, version))
    where = f"{smolvm.executable} is smolvm {shown}"
    if not SUPPORTED[0] <= version < SUPPORTED[1]:
        detail = f"{where}; bottle supports {SUPPORTED_TEXT}"
        return Check(name="smolvm", ok=False, detail=detail, fix=INSTALL_SMOLVM), shown
    return Check(name="smolvm", ok=True, detail=f"{where} (supported: {SUPPORTED_TEXT})"), shown


def check_settings() -> Check:
    """Name the SMOLVM_* settings of this shell that bottle does not hand to smolvm."""
    dropped = dropped_settings(os.environ)
    detail = "smolvm runs with seccomp and Landlock enforced and no SMOLVM_* setting that widens its network"
    if dropped:
        detail += f"; not passed on: {', '.join(dropped)}"
    if os.environ.get("SMOLVM_VM_UID_DROP"):
        detail += "; SMOLVM_VM_UID_DROP is set, so VMs do not run under a user of their own"
    return Check(name="smolvm settings", ok=True, detail=detail)


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
