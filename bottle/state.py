"""Where bottles live on disk: one private directory per slug, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import platformdirs

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
    """Create `path` (and parents) readable by the owner only; tighten it if it already exists."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
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

    def slugs(self) -> list[str]:
        bottles = self.root / "bottles"
        return sorted(p.name for p in bottles.iterdir() if p.is_dir()) if bottles.is_dir() else []
