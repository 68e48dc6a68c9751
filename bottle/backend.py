"""The Backend interface: what bottle asks of every way of running a bottle.

A backend is found through the entry-point group `bottle.backends` (see bottle.registry); its entry
point names a `Backend` subclass whose `name` equals the entry point's name. bottle instantiates it with
no arguments, so anything machine-specific is read from the environment in `__init__`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

from bottle.manifest import is_slug
from bottle.plan import BottlePlan

if TYPE_CHECKING:
    import docker

    from bottle.manifest import Manifest
    from bottle.state import StateStore


LABEL_MANAGED = "bottle.managed"
LABEL_SLUG = "bottle.slug"
LABEL_BACKEND = "bottle.backend"
LABEL_OWNER = "bottle.owner"
LABEL_ROLE = "bottle.role"  # what a container is to its bottle: "bundle", ...


def labels(slug: str, backend: str, owner: str) -> dict[str, str]:
    """The labels on every docker resource a bottle owns: how `ls`, `down` and `gc` find it again.

    `owner` is the state root's id (`StateStore.owner`): it ties the resource to the state directory
    that made it, so another BOTTLE_HOME, another user or an image's inherited labels never count.
    """
    return {LABEL_MANAGED: "true", LABEL_SLUG: slug, LABEL_BACKEND: backend, LABEL_OWNER: owner}


def label_filter(wanted: dict[str, str]) -> list[str]:
    """Labels as the Engine's `label` filter takes them: every one must be present with its value."""
    return [f"{key}={value}" for key, value in wanted.items()]


def owned_slug(resource_labels: dict[str, str] | None, backend: str, owner: str | None) -> str | None:
    """The slug of a resource if it is this state root's and this backend's, else None.

    Labels are data from outside (a container inherits its image's labels): the slug is returned only
    when it is a valid slug, so it can safely name a path, and only with every label of `labels()`.
    """
    found = resource_labels or {}
    slug = found.get(LABEL_SLUG)
    if owner is None or not is_slug(slug) or found != found | labels(slug, backend, owner):
        return None
    return slug


def why_not_owned(resource_labels: dict[str, str] | None, backend: str, owner: str | None) -> str:
    """Why a resource that carries bottle's labels is not this state root's, in a few words."""
    found = resource_labels or {}
    if not is_slug(found.get(LABEL_SLUG)):
        return f"its {LABEL_SLUG} label is not a bottle slug"
    if found.get(LABEL_MANAGED) != "true":
        return f"its {LABEL_MANAGED} label is not 'true'"
    if found.get(LABEL_BACKEND) != backend:
        return f"its {LABEL_BACKEND} label is not '{backend}'"
    return "it was not made from this state directory"


class Check(BaseModel):
    """One thing preflight looked at: what it is, whether it is fine, what was seen, how to fix it."""

    model_config = ConfigDict(frozen=True)

    name: str
    ok: bool
    detail: str
    fix: str | None = None


class PreflightReport(BaseModel):
    """Every check a backend made, plus facts it learned that its plan records (e.g. a tool's version)."""

    model_config = ConfigDict(frozen=True)

    backend: str
    checks: list[Check]
    facts: dict[str, str] = {}

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def problems(self) -> list[str]:
        return [f"{c.name}: {c.detail}" + (f" ({c.fix})" if c.fix else "") for c in self.checks if not c.ok]


class BottleStatus(BaseModel):
    """One bottle as `bottle ls` shows it: what each part is doing, and what does not add up."""

    model_config = ConfigDict(frozen=True)

    slug: str
    name: str | None  # None when no plan is on disk (a leftover `bottle gc` removes)
    backend: str
    address: str | None  # the bundle's IP, where the plan knows it
    parts: dict[str, str]  # part -> "running", "present", "exited", "missing", ...
    drift: list[str]  # one sentence per inconsistency, each saying how to resolve it
    foreign: bool = False  # carries bottle's labels but is not this state root's: shown, never removed

    @property
    def orphan(self) -> bool:
        return self.name is None and not self.foreign

    @property
    def state(self) -> str:
        up = [v in {"running", "present"} for v in self.parts.values()]
        if self.foreign:
            return "foreign"
        if self.orphan:
            return "orphan"
        return "running" if all(up) else "down" if not any(up) else "partial"


class Backend(ABC):
    """A way to run a bottle: an agent VM whose only reachable address is its bundle."""

    #: The name users write as `backend = "..."`; equal to the entry point's name.
    name: ClassVar[str]
    #: The pydantic model of this backend's plans; `bottle` reads plans from disk with it.
    plan_type: ClassVar[type[BottlePlan]]
    #: Whether it runs bottles on the Docker Engine. One that does not is passed `docker=None` and is
    #: usable where no Engine is.
    needs_docker: ClassVar[bool] = True

    @abstractmethod
    def preflight(self, *, docker: docker.DockerClient | None, manifest: Manifest | None = None) -> PreflightReport:
        """Check that this machine can run the backend's bottles; report every problem, never raise.

        `docker` is None when no Docker Engine could be reached. `manifest`, when given, is the bottle
        about to be planned or started, for checks that depend on it. No side effects: only look.
        """

    @abstractmethod
    def plan(
        self, manifest: Manifest, *, docker: docker.DockerClient, state: StateStore, preflight: PreflightReport
    ) -> BottlePlan:
        """Return the plan `prepare` would make now, without creating or writing anything.

        May read the Docker Engine's state (list networks); must not change it or write to disk.
        """

    @abstractmethod
    def prepare(
        self, manifest: Manifest, *, docker: docker.DockerClient, state: StateStore, preflight: PreflightReport
    ) -> BottlePlan:
        """Create what the bottle needs before launch, save its plan (`state.save_plan`) and return it.

        Allowed side effects: docker resources labelled with `labels(slug, name, state.owner(create=True))`,
        and files inside `state.bottle_dir(slug)`, written with `state.write_private` (0600 from the
        first byte, never through a link). Adopt only resources that carry this owner's labels.
        Running it twice is a no-op the second time and returns an equal plan. If it fails, it removes
        whatever it created in that call, then raises a `bottle.errors.BottleError`. The caller holds
        the bottle's lock.
        """

    @abstractmethod
    def up(
        self,
        manifest: Manifest,
        *,
        docker: docker.DockerClient,
        state: StateStore,
        preflight: PreflightReport,
        on_step: Callable[[str, str], None],
    ) -> BottlePlan:
        """Prepare the bottle, save its plan (`state.save_plan`) and start every part of it.

        Each step adopts what is already up, so `up` of a running bottle changes nothing. If a step
        fails, or the user interrupts (KeyboardInterrupt), remove what this call created, newest first,
        then re-raise; failures are `bottle.errors.StepFailed` naming the step. Report progress through
        `on_step(step, detail)`. The caller holds the bottle's lock.
        """

    @abstractmethod
    def attach(self, plan: BottlePlan, *, tty: bool) -> int:
        """Run the agent in the bottle with the user's terminal attached; return its exit code."""

    def run(self, plan: BottlePlan, command: list[str], *, docker: docker.DockerClient, timeout: float) -> tuple[int, str]:
        """Run `command` in the running agent without a terminal; return its exit code and its output.

        What bottle's confinement suite (`bottle.testing.confinement`) drives; a backend that cannot
        run commands in its agent leaves it unimplemented.
        """
        raise NotImplementedError(f"backend '{self.name}' cannot run commands in its agent")

    def bundle_log(self, slug: str, *, docker: docker.DockerClient | None, state: StateStore,
                   follow: bool) -> Iterable[bytes]:  # fmt: skip
        """The bundle's audit log as it streams (one JSON object a line); the default reads the stdout of
        the bottle's bundle container on the Docker Engine."""
        from bottle import sidecar

        return sidecar.bundle_log(docker, state, slug, follow=follow)

    @abstractmethod
    def down(self, slug: str, *, docker: docker.DockerClient, state: StateStore) -> list[str]:
        """Remove every part of the bottle that exists, and its state directory; keep shared caches.

        Works from names and labels alone, so it also cleans up after a crash, and touches only what
        carries this state root's owner labels (`owned_slug`). Succeeds when nothing
        is left; returns one description per thing removed. The caller holds the bottle's lock.
        """

    @abstractmethod
    def inventory(self, *, docker: docker.DockerClient, state: StateStore) -> list[BottleStatus]:
        """Every bottle of this backend with a trace on this machine: a plan on disk, or a resource."""
