"""A thin client for the smolvm CLI, as the real binary behaves (observed on 1.31.0 to 1.32.2).

Every call passes `--error-format json`, so a failure is branched on by smolvm's stable error code
(`NOT_FOUND`, `CONFIG_ERROR`, ...), never on its wording. smolvm runs with an environment bottle builds
for it: none of the host's secrets, none of the SMOLVM_* settings that would widen a VM's network, and
the VMM's seccomp and Landlock confinement switched on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bottle.errors import StepFailed
from bottle.state import StateStore

# The host variables smolvm is started with; the rest of the host's environment may hold the very
# credentials bottle keeps out of the VM.
PASSED_ENV = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
    "XDG_RUNTIME_DIR", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME",
    "TERM", "COLORTERM", "COLUMNS", "LINES",
})  # fmt: skip
# smolvm's own settings that say where its parts and data are, or how long to wait, and
# SMOLVM_VM_UID_DROP, which root needs (`doctor` names it when set, since it weakens the VMM). Every other
# SMOLVM_* variable is dropped: SMOLVM_PUBLISH_ADDR and SMOLVM_EGRESS_FLOOR change egress rules,
# SMOLVM_ALLOW_HOST_LOOPBACK and SMOLVM_EGRESS_ALLOW_PRIVATE open more of the host, SMOLVM_MACHINE_NAME
# renames machines.
PASSED_SMOLVM_ENV = frozenset({
    "SMOLVM_LIB_DIR", "SMOLVM_AGENT_ROOTFS", "SMOLVM_AGENT_ROOTFS_TAR", "SMOLVM_DATA_DIR",
    "SMOLVM_VM_UID_DROP", "SMOLVM_AGENT_READY_TIMEOUT_SECS",
})  # fmt: skip
# The CLI's VMM runs unconfined unless told otherwise (smolvm's own SDK and server switch these on).
CONFINEMENT = {"SMOLVM_SECCOMP": "enforce", "SMOLVM_LANDLOCK": "enforce"}
STATE_DIR_ENV = "BOTTLE_SMOLVM_STATE_DIR"  # keep bottle's machines in their own smolvm state (Linux)
EXECUTABLE_ENV = "BOTTLE_SMOLVM"  # the smolvm to use, instead of PATH's or the smolmachines wheel's


def smolvm_environment(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The environment smolvm runs with: the few variables it needs, and no secret of the host's."""
    kept = {k: v for k, v in environ.items() if k in PASSED_ENV or k in PASSED_SMOLVM_ENV}
    return kept | CONFINEMENT


def dropped_settings(environ: dict[str, str] | os._Environ[str]) -> list[str]:
    """The SMOLVM_* variables set here that bottle does not pass on (for `doctor` to name)."""
    return sorted(k for k in environ if k.startswith("SMOLVM_") and k not in PASSED_SMOLVM_ENV | set(CONFINEMENT))


class SmolvmFailed(StepFailed):
    """smolvm refused or failed; `code` is its stable error code (`USAGE` for a command-line error)."""

    def __init__(self, step: str, code: str, message: str):
        self.code = code
        super().__init__(step, f"smolvm: {message} ({code})")


@dataclass
class Smolvm:
    """One smolvm executable, the environment it needs, and (optionally) its own state directory."""

    executable: str = "smolvm"
    env: dict[str, str] = field(default_factory=dict)
    state_dir: Path | None = None

    @property
    def installed(self) -> bool:
        """Whether the executable exists; without it there can be no machines to find or remove."""
        return shutil.which(self.executable) is not None

    def argv(self, *args: str) -> list[str]:
        state = ["--state-dir", str(self.state_dir)] if self.state_dir else []
        return [self.executable, "--error-format", "json", *state, *args]

    def environment(self) -> dict[str, str]:
        return smolvm_environment(os.environ) | self.env

    def _call(self, step: str, args: list[str], *, timeout: float | None, doing: str) -> subprocess.CompletedProcess:
        """Run smolvm with `args`; only a failure to run it, or to finish in time, is raised here."""
        try:
            return subprocess.run(
                self.argv(*args), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                env=self.environment(), timeout=timeout, check=False,
            )  # fmt: skip
        except OSError as exc:
            raise StepFailed(step, f"could not run {self.executable}: {exc.strerror}") from None
        except subprocess.TimeoutExpired:
            raise StepFailed(step, f"{doing} did not finish within {timeout:.0f} s") from None

    def _run(self, step: str, args: list[str], *, timeout: float | None = None) -> str:
        result = self._call(step, args, timeout=timeout, doing=f"smolvm {' '.join(args[:2])}")
        if result.returncode != 0:
            raise SmolvmFailed(step, *error_of(result.returncode, result.stderr))
        return result.stdout

    def version(self) -> str:
        return self._run("version", ["--version"], timeout=10).strip()

    def create(self, name: str, image: str, smolfile: Path, *, labels: dict[str, str], flags: list[str],
               command: list[str]) -> None:  # fmt: skip
        """Create the machine from an image and the Smolfile; `command` is its persistent workload."""
        label_args = [arg for key, value in sorted(labels.items()) for arg in ("--label", f"{key}={value}")]
        args = ["machine", "create", "--name", name, "--image", image, "--smolfile", str(smolfile)]
        self._run("machine create", [*args, *label_args, *flags, "--", *command])

    def start(self, name: str) -> None:
        self._run("machine start", ["machine", "start", "--name", name])

    def delete(self, name: str) -> bool:
        """Delete the machine, running or not; False if there was none by that name."""
        try:
            self._run("machine delete", ["machine", "delete", "--name", name, "--force"])
        except SmolvmFailed as exc:
            if exc.code == "NOT_FOUND":
                return False
            raise
        return True

    def machines(self) -> dict[str, dict[str, Any]]:
        """Every machine smolvm knows, by name, as `machine ls --json` describes it."""
        output = self._run("machine ls", ["machine", "ls", "--json"])
        try:
            return {m["name"]: m for m in json.loads(output)}
        except (ValueError, KeyError, TypeError):
            raise StepFailed("machine ls", "smolvm machine ls --json printed something that is not a list") from None

    def exec(self, step: str, name: str, command: list[str], *, timeout: float) -> subprocess.CompletedProcess:
        """Run a command in the running machine; its exit code and output are the caller's to judge."""
        args = ["machine", "exec", "--name", name, "--", *command]
        return self._call(step, args, timeout=timeout, doing=f"the command in {name}")

    def attach(self, name: str, command: list[str], *, tty: bool) -> int:
        """Run the agent with the user's terminal attached; return its exit code."""
        args = ["machine", "exec", "--name", name, *(["-i", "-t"] if tty else ["-i"]), "--", *command]
        return subprocess.run(self.argv(*args), check=False, env=self.environment()).returncode


def error_of(returncode: int, stderr: str) -> tuple[str, str]:
    """smolvm's error code and message from its stderr; a usage error (exit 2) is clap's text."""
    for line in reversed(stderr.strip().splitlines()):
        try:
            error = json.loads(line)["error"]
            return str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            continue
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    said = lines[0].removeprefix("error: ") if lines else f"exited {returncode} with no output"
    return ("USAGE" if returncode == 2 else "UNKNOWN"), said


def find(state: StateStore) -> Smolvm | None:
    """The smolvm bottle uses: $BOTTLE_SMOLVM, else `smolvm` on PATH, else the smolmachines wheel's engine."""
    state_dir = Path(os.environ[STATE_DIR_ENV]) if os.environ.get(STATE_DIR_ENV) else None
    if chosen := os.environ.get(EXECUTABLE_ENV) or shutil.which("smolvm"):
        return Smolvm(chosen, state_dir=state_dir)
    engine = wheel_engine(state)
    if engine is not None:
        engine.state_dir = state_dir
    return engine


def wheel_engine(state: StateStore) -> Smolvm | None:
    """The engine inside the `smolmachines` wheel (`pip install 'bottle[smolvm]'`), or None.

    The wheel ships the CLI as `smol-vmm`; under any name but `smolvm` it looks for a packed sidecar
    and says so on every run, so bottle links it into its cache under that name (a copy where a link
    cannot be made). The libraries and the agent's root filesystem stay in the wheel.
    """
    spec = importlib.util.find_spec("smol")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    source = package / "smol-vmm"
    if not source.is_file():
        return None
    rootfs = next((p for p in (package / "agent-rootfs.tar.zst", package / "agent-rootfs.tar") if p.exists()), None)
    env = {"SMOLVM_LIB_DIR": str(package)} | ({"SMOLVM_AGENT_ROOTFS_TAR": str(rootfs)} if rootfs else {})
    return Smolvm(str(_linked(source, state)), env=env)


def _linked(source: Path, state: StateStore) -> Path:
    """`source` as `smolvm` in a private directory of bottle's cache, made once per build of it."""
    seen = source.stat()
    target = state.cache_dir() / "smolvm" / f"{seen.st_size}-{seen.st_mtime_ns}" / "smolvm"
    if state.is_file(target):
        return target
    directory = state.private_dir(target.parent)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        partial = Path(scratch) / "smolvm"
        try:
            os.link(source, partial)
        except OSError:  # another file system: a copy, made executable by its owner only
            shutil.copy2(source, partial)
            os.chmod(partial, 0o700)
        os.replace(partial, target)
    return target
