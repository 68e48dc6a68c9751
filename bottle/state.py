"""Where bottles live on disk: one private directory per slug, written atomically, never through a link.

Everything below the state root is opened one component at a time with `O_NOFOLLOW` and `dir_fd`, so
a symbolic link planted where bottle expects its own directory or file is refused, never followed:
no key, secret or chmod can be redirected elsewhere. The root itself may be a link (the user's choice).
Every directory bottle makes is 0700 and every file 0600, set explicitly whatever the umask.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import platformdirs

from bottle.errors import Busy, StateError
from bottle.manifest import is_slug
from bottle.plan import BottlePlan

PLAN_FILE = "plan.json"
OWNER_FILE = "owner"  # a random id: the `bottle.owner` label of every resource made from this state root
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LINKED = (errno.ELOOP, errno.ENOTDIR)  # what O_NOFOLLOW / O_DIRECTORY say about a link or a file


def default_root() -> Path:
    """`$BOTTLE_HOME`, or the platform's per-user state directory (~/.local/state/bottle on Linux)."""
    return Path(os.environ.get("BOTTLE_HOME") or platformdirs.user_state_path("bottle"))


@contextmanager
def _explained(path: Path, doing: str) -> Iterator[None]:
    """Turn an OSError about `path` into one sentence that names it."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _LINKED:
            raise StateError(
                f"{path} is a symbolic link, or not the kind of file bottle made there; bottle never follows "
                "links in its state directory: move it away and try again"
            ) from None
        raise StateError(
            f"cannot {doing} {path}: {exc.strerror or exc}; check the disk and the permissions of the "
            "state directory (set BOTTLE_HOME to use another)"
        ) from None


def _make_root(root: Path) -> None:
    """Create the state root and any missing parents, each 0700 whatever the umask."""
    for missing in reversed([p for p in (root, *root.parents) if not p.exists()]):
        try:
            missing.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(missing, 0o700)


class StateStore:
    """The bottles on this machine: `<root>/bottles/<slug>/` holds a bottle's plan, Smolfile and bundle files."""

    def __init__(self, root: Path | None = None):
        self.root = root or default_root()

    def bottle_dir(self, slug: str) -> Path:
        if not is_slug(slug):  # a slug read from outside (a docker label) must never become a path
            raise StateError(f"{slug!r} is not a bottle slug, so it names no state directory")
        return self.root / "bottles" / slug

    def cache_dir(self) -> Path:
        return self.root / "cache"

    # -- the one way in: open a directory below the root without following links

    def _parts(self, path: Path) -> tuple[str, ...]:
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:
            raise StateError(f"{path} is outside bottle's state directory {self.root}") from None
        if any(p in {"..", "."} for p in parts):
            raise StateError(f"{path} is outside bottle's state directory {self.root}")
        return parts

    def _open_dir(self, path: Path, *, create: bool) -> int | None:
        """An fd of directory `path` (below or at the root); None if it is missing and `create` is off."""
        parts = self._parts(path)
        with _explained(self.root, "create" if create else "open"):
            if create:
                _make_root(self.root)
            try:
                fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
        current = self.root
        try:
            for part in parts:
                current = current / part
                with _explained(current, "create" if create else "open"):
                    if create:
                        try:
                            os.mkdir(part, 0o700, dir_fd=fd)
                        except FileExistsError:
                            pass
                    try:
                        child = os.open(part, _DIR, dir_fd=fd)
                    except FileNotFoundError:
                        os.close(fd)
                        return None
                    os.close(fd)
                    fd = child
                    if create:
                        os.fchmod(fd, 0o700)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextmanager
    def _dir(self, path: Path, *, create: bool) -> Iterator[int | None]:
        fd = self._open_dir(path, create=create)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def private_dir(self, path: Path) -> Path:
        """Create directory `path` below the root (and its parents), each 0700; refuse links on the way."""
        with self._dir(path, create=True):
            return path

    def write_private(self, path: Path, data: bytes, *, mode: int = 0o600) -> None:
        """Write `data` to `path` atomically, 0600 from its first byte, never through a link.

        `mode` 0o644 is for a public certificate an unprivileged agent must read; the file still lives
        in the root's 0700 directories, and is made readable only once it is whole.
        """
        with self._dir(path.parent, create=True) as fd, _explained(path, "write"):
            temporary = f".{path.name}.{secrets.token_hex(6)}"
            file = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                           dir_fd=fd)  # fmt: skip
            try:
                with os.fdopen(file, "wb") as f:
                    os.fchmod(f.fileno(), 0o600)
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                    os.fchmod(f.fileno(), mode)
                os.replace(temporary, path.name, src_dir_fd=fd, dst_dir_fd=fd)  # replaces a link, never follows it
            except BaseException:
                try:
                    os.unlink(temporary, dir_fd=fd)
                except OSError:
                    pass
                raise

    def read(self, path: Path) -> bytes | None:
        """The bytes of file `path` below the root, or None when it (or a directory above it) is missing."""
        with self._dir(path.parent, create=False) as fd, _explained(path, "read"):
            if fd is None:
                return None
            try:
                file = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                return None
            with os.fdopen(file, "rb") as f:
                return f.read()

    def is_file(self, path: Path, *, mode: int | None = None) -> bool:
        """Whether `path` below the root is a regular file (with exactly `mode`, if given), reached without
        following any link."""
        with self._dir(path.parent, create=False) as fd, _explained(path, "look at"):
            if fd is None or not _is(stat.S_ISREG, fd, path.name):
                return False
            return mode is None or stat.S_IMODE(os.stat(path.name, dir_fd=fd, follow_symlinks=False).st_mode) == mode

    def remove_file(self, path: Path) -> None:
        """Delete file `path` below the root if it exists (unlink never follows a link)."""
        with self._dir(path.parent, create=False) as fd, _explained(path, "remove"):
            if fd is not None:
                try:
                    os.unlink(path.name, dir_fd=fd)
                except FileNotFoundError:
                    pass

    # -- what lives there

    def owner(self, *, create: bool = False) -> str | None:
        """This state root's owner id, made at random on first use; None if there is none and `create` is off.

        Every docker resource bottle makes carries it as `bottle.owner`, and `down`, `gc` and `prepare`
        touch only resources that carry it: a label anyone could copy is not proof of ownership, an
        unguessable id kept 0600 in the state root is.
        """
        path = self.root / OWNER_FILE
        found = self.read(path)
        if found is not None:
            if not re.fullmatch(rb"[0-9a-f]{32}", found):
                raise StateError(f"{path} is not an owner id bottle wrote; restore it or remove it (bottle then "
                                 "no longer recognises the resources it made before, which `docker rm` removes)")
            return found.decode()
        if not create:
            return None
        candidate = secrets.token_hex(16)
        staged = self.root / f".{OWNER_FILE}.{candidate[:8]}"
        self.write_private(staged, candidate.encode())
        with self._dir(self.root, create=False) as fd, _explained(path, "create"):
            try:
                os.link(staged.name, OWNER_FILE, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
            except FileExistsError:
                pass  # another process made it first: its id wins
            finally:
                os.unlink(staged.name, dir_fd=fd)
        return self.owner()

    def save_plan(self, plan: BottlePlan) -> Path:
        path = self.bottle_dir(plan.slug) / PLAN_FILE
        self.write_private(path, plan.model_dump_json(indent=2).encode() + b"\n")
        return path

    def read_plan_data(self, slug: str) -> dict | None:
        """The raw plan JSON of a bottle, or None when it has none; the caller picks the plan model."""
        data = self.read(self.bottle_dir(slug) / PLAN_FILE)
        if data is None:
            return None
        try:
            plan = json.loads(data)
        except ValueError:
            plan = None
        if not isinstance(plan, dict):
            raise StateError(
                f"{self.bottle_dir(slug) / PLAN_FILE} is not a plan bottle wrote; "
                f"`bottle down {slug}` removes the bottle"
            )
        return plan

    def remove_bottle(self, slug: str) -> Path | None:
        """Delete a bottle's state directory (a link there is refused, not followed); return it if there was one."""
        path = self.bottle_dir(slug)
        with self._dir(path.parent, create=False) as fd, _explained(path, "remove"):
            if fd is None:
                return None
            try:
                found = os.stat(slug, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            if not stat.S_ISDIR(found.st_mode):  # refuse a link before deleting anything
                raise OSError(errno.ENOTDIR, "not a directory")
            shutil.rmtree(slug, dir_fd=fd)
        return path

    @contextmanager
    def lock(
        self, slug: str, *, timeout: float = 600.0, on_wait: Callable[[], None] = lambda: None
    ) -> Iterator[None]:
        """Hold the bottle's lock, so one command at a time changes it; wait up to `timeout` seconds.

        The lock is an flock on a file, so it is released by the kernel when its holder dies. On a
        read-only state directory the lock is taken on the existing file, or skipped when there is none
        (no other command can change that state either), so `down` can still remove the bottle's resources.
        """
        if not is_slug(slug):
            raise StateError(f"{slug!r} is not a bottle slug")
        path = self.root / "locks" / f"{slug}.lock"
        handle = self._open_lock(path)
        try:
            deadline = time.monotonic() + timeout
            waited = False
            while handle is not None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited:
                        on_wait()
                        waited = True
                    if time.monotonic() > deadline:
                        raise Busy(
                            f"another bottle command has been working on '{slug}' for {timeout:.0f} s; "
                            "try again when it finishes"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            if handle is not None:
                os.close(handle)

    def _open_lock(self, path: Path) -> int | None:
        flags = os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            with self._dir(path.parent, create=True) as fd, _explained(path, "open"):
                handle = os.open(path.name, os.O_RDWR | os.O_CREAT | flags, 0o600, dir_fd=fd)
                os.fchmod(handle, 0o600)
                return handle
        except StateError:
            if not _read_only(self.root):
                raise
        with self._dir(path.parent, create=False) as fd, _explained(path, "open"):
            try:
                return os.open(path.name, os.O_RDONLY | flags, dir_fd=fd) if fd is not None else None
            except FileNotFoundError:
                return None

    def slugs(self) -> list[str]:
        """The slugs of every bottle with a plan on disk; entries that are not bottle directories are skipped."""
        bottles = self.root / "bottles"
        with self._dir(bottles, create=False) as fd, _explained(bottles, "list"):
            if fd is None:
                return []
            names = [n for n in os.listdir(fd) if is_slug(n) and _is(stat.S_ISDIR, fd, n)]
            return sorted(n for n in names if _is(stat.S_ISREG, fd, f"{n}/{PLAN_FILE}"))


    def file_names(self, directory: Path) -> list[str]:
        """The names of the regular files in `directory` below the root (no links); none if it is missing."""
        with self._dir(directory, create=False) as fd, _explained(directory, "list"):
            if fd is None:
                return []
            return sorted(n for n in os.listdir(fd) if _is(stat.S_ISREG, fd, n))


def _is(kind: Callable[[int], bool], dir_fd: int, relative: str) -> bool:
    """Whether `relative` (below `dir_fd`, its last component not followed) exists and is of `kind`."""
    try:
        return kind(os.stat(relative, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
