"""A thin client for the smolvm CLI: each call names the `bottle up` step it serves, for errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from bottle.errors import StepFailed

# What smolvm is started with: the host's environment is not passed on, since it may hold the very
# credentials bottle keeps out of the VM. Names here, plus smolvm's own SMOLVM_* settings.
PASSED_ENV = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
    "XDG_RUNTIME_DIR", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME",
    "TERM", "COLORTERM", "COLUMNS", "LINES",
})  # fmt: skip


def smolvm_environment(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The environment smolvm runs with: the few variables it needs, and no secret of the host's."""
    return {k: v for k, v in environ.items() if k in PASSED_ENV or k.startswith("SMOLVM_")}


class Smolvm:
    """Runs `smolvm` subcommands; a non-zero exit becomes StepFailed with smolvm's own last line."""

    def __init__(self, executable: str = "smolvm"):
        self.executable = executable

    @property
    def installed(self) -> bool:
        """Whether the executable exists; without it there can be no machines to find or remove."""
        return shutil.which(self.executable) is not None

    def _run(self, step: str, args: list[str], *, show_progress: bool = False) -> str:
        """Run smolvm; with `show_progress`, its output is copied to our stderr line by line as it comes."""
        try:
            process = subprocess.Popen(
                [self.executable, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if show_progress else subprocess.PIPE,
                text=True,
                env=smolvm_environment(os.environ),
            )
        except OSError as exc:
            raise StepFailed(step, f"could not run {self.executable}: {exc.strerror}") from None
        with process:
            try:
                if show_progress:
                    tail: deque[str] = deque(maxlen=5)
                    for line in process.stdout or []:
                        sys.stderr.write(line)
                        tail.append(line)
                    process.wait()
                    stdout = stderr = "".join(tail)
                else:
                    stdout, stderr = process.communicate()
            except BaseException:  # e.g. Ctrl-C: smolvm must not outlive us
                process.kill()
                raise
        if process.returncode != 0:
            said = (stderr or stdout or "").strip().splitlines()
            reason = said[-1] if said else "no output"
            raise StepFailed(step, f"smolvm {' '.join(args[:2])} exited {process.returncode}: {reason}")
        return stdout

    def pack(self, image: str, output: Path) -> None:
        """Pack `image` into a .smolmachine at `output`; smolvm's progress goes to the user's terminal."""
        self._run("pack", ["pack", "create", "--image", image, "--output", str(output)], show_progress=True)

    def create(self, name: str, artifact: Path, flags: list[str]) -> None:
        self._run("machine create", ["machine", "create", name, "--from", str(artifact), *flags])

    def start(self, name: str) -> None:
        self._run("machine start", ["machine", "start", "--name", name])

    def delete(self, name: str) -> None:
        self._run("machine delete", ["machine", "delete", name, "--force"])

    def machines(self) -> dict[str, dict[str, Any]]:
        """Every machine smolvm knows, by name, as `machine ls --json` describes it."""
        output = self._run("machine ls", ["machine", "ls", "--json"])
        try:
            return {m["name"]: m for m in json.loads(output)}
        except (ValueError, KeyError, TypeError):
            raise StepFailed("machine ls", "smolvm machine ls --json printed something that is not a list") from None

    def probe(self, name: str) -> None:
        """Run `true` in the machine: proves the VM boots and runs commands before anyone attaches."""
        self._run("exec", ["machine", "exec", "--name", name, "--", "true"])

    def attach(self, name: str, command: list[str], *, tty: bool) -> int:
        """Run the agent with the user's terminal attached; return its exit code."""
        args = ["machine", "exec", "--name", name, *(["-i", "-t"] if tty else ["-i"]), "--", *command]
        return subprocess.run([self.executable, *args], check=False, env=smolvm_environment(os.environ)).returncode
