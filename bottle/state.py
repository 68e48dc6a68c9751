"""Where bottles live on disk: one private directory per slug, written atomically."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import platformdirs

from bottle.errors import BottleError
from bottle.plan import BottlePlan

PLAN_FILE = "plan.json"


def default_root() -> Path:
    """`$BOTTLE_HOME`, or the platform's per-user state directory (~/.local/state/bottle on Linux)."""
    return Path(os.environ.get("BOTTLE_HOME") or platformdirs.user_state_path("bottle"))


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically; the file is 0600 from its first byte and never seen half-written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates files 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def make_private_dir(path: Path) -> Path:
    """Create `path` and any missing parents, each owner-only; tighten `path` if it already exists."""
    for missing in reversed([p for p in (path, *path.parents) if not p.exists()]):
        missing.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


class StateStore:
    """The bottles on this machine: `<root>/bottles/<slug>/` holds a bottle's plan and Smolfile."""

    def __init__(self, root: Path | None = None):
        self.root = root or default_root()

    def bottle_dir(self, slug: str) -> Path:
        return self.root / "bottles" / slug

    def cache_dir(self) -> Path:
        return self.root / "cache"

    def save_plan(self, plan: BottlePlan) -> Path:
        path = make_private_dir(self.bottle_dir(plan.slug)) / PLAN_FILE
        write_private(path, plan.model_dump_json(indent=2).encode() + b"\n")
        return path

    def read_plan_data(self, slug: str) -> dict | None:
        """The raw plan JSON of a bottle, or None when it has none; the caller picks the plan model."""
        try:
            return json.loads((self.bottle_dir(slug) / PLAN_FILE).read_text())
        except FileNotFoundError:
            return None

    def remove_bottle(self, slug: str) -> Path | None:
        """Delete a bottle's state directory; return it if there was one."""
        path = self.bottle_dir(slug)
        if not path.exists():
            return None
        shutil.rmtree(path)
        return path

    @contextmanager
    def lock(
        self, slug: str, *, timeout: float = 600.0, on_wait: Callable[[], None] = lambda: None
    ) -> Iterator[None]:
        """Hold the bottle's lock, so one command at a time changes it; wait up to `timeout` seconds.

        The lock is an flock on a file, so it is released by the kernel when its holder dies.
        """
        path = make_private_dir(self.root / "locks") / f"{slug}.lock"
        with open(path, "a") as handle:
            deadline = time.monotonic() + timeout
            waited = False
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited:
                        on_wait()
                        waited = True
                    if time.monotonic() > deadline:
                        raise BottleError(
                            f"another bottle command has been working on '{slug}' for {timeout:.0f} s; "
                            "try again when it finishes"
                        ) from None
                    time.sleep(0.05)
            yield

    def slugs(self) -> list[str]:
        bottles = self.root / "bottles"
        if not bottles.is_dir():
            return []
        return sorted(p.name for p in bottles.iterdir() if (p / PLAN_FILE).is_file())
