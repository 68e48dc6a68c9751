"""Find backends through the entry-point group `bottle.backends`; bottle's own are registered there too."""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType

from bottle.backend import Backend
from bottle.errors import BackendBroken, BackendNotFound

GROUP = "bottle.backends"


def _origin(ep: EntryPoint) -> str:
    dist = ep.dist.name if ep.dist else "an unknown distribution"
    return f"{ep.value} (from {dist})"


def available() -> Mapping[str, EntryPoint]:
    """The installed backends by name, read-only; nothing is imported until `load`."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        other = found.get(ep.name)
        if other is not None and other.value != ep.value:
            raise BackendBroken(
                f"two installed packages register backend '{ep.name}': {_origin(other)} and {_origin(ep)}; "
                "uninstall one of them"
            )
        found[ep.name] = ep
    return MappingProxyType(dict(sorted(found.items())))


def load(name: str) -> type[Backend]:
    """The backend class registered as `name`, with a clear error when it is missing or broken."""
    backends = available()
    ep = backends.get(name)
    if ep is None:
        installed = ", ".join(backends) or "none"
        raise BackendNotFound(
            f"unknown backend '{name}'; installed backends: {installed} "
            "(install the package that provides it, or fix `backend` in bottle.toml)"
        )
    try:
        cls = ep.load()
    except Exception as exc:  # a broken plugin must not take bottle down with a traceback
        raise BackendBroken(f"backend '{name}' from {_origin(ep)} failed to import: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Backend)) or cls.name != name:
        raise BackendBroken(f"backend '{name}' from {_origin(ep)} is not a Backend subclass named '{name}'")
    return cls
