"""The one exception tree bottle raises; the CLI maps it to exit codes and one-line messages."""

from __future__ import annotations


class BottleError(Exception):
    """Base of every error a user can meet: its message is one sentence that says what to do."""

    exit_code = 1


class UsageError(BottleError):
    """The user's input is wrong (manifest, arguments, backend name): exit code 2."""

    exit_code = 2


class ManifestError(UsageError):
    """The manifest cannot be read or does not validate."""


class BackendNotFound(UsageError):
    """No installed backend has the requested name."""


class EnvironmentProblem(BottleError):
    """The machine is missing something bottle needs (Docker, smolvm, KVM, a free subnet): exit code 1."""


class BackendBroken(EnvironmentProblem):
    """An installed backend cannot be used: two packages register its name, or it fails to import."""


class PreflightFailed(EnvironmentProblem):
    """One or more preflight checks failed; `problems` lists every one of them."""

    def __init__(self, backend: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"backend '{backend}' is not ready on this machine:\n{lines}")


class AddressPoolExhausted(EnvironmentProblem):
    """Every /24 in the configured pool is taken."""


class Busy(BottleError):
    """Another bottle command holds the bottle's lock."""


class StateError(EnvironmentProblem):
    """bottle's state directory cannot be used: a path is missing, read-only, full, or a link bottle refuses."""


class DockerProblem(EnvironmentProblem):
    """The Docker Engine refused or failed a request bottle made."""


class StepFailed(BottleError):
    """A step of `bottle up` failed; `step` names it, and what that run created has been removed."""

    def __init__(self, step: str, reason: str):
        self.step = step
        self.reason = reason
        super().__init__(f"step '{step}' failed: {reason}")
