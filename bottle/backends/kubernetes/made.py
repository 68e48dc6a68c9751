"""What this state directory made on clusters: each object's kind, place and uid, kept 0600 at the state root.

On a cluster, labels prove nothing: anyone who may list the bottle's objects reads its `bottle.owner`
label and can put it on objects of their own. A uid is assigned by the API server and cannot be chosen,
so bottle adopts, updates and deletes only objects whose uid it recorded when it created them; an
object that merely carries its labels is shown as foreign and left alone. The record lives beside the
owner id, outside the bottle's own directory, so `gc` still finds what a removed bottle left behind.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from bottle.errors import StateError
from bottle.manifest import is_slug
from bottle.state import StateStore


class Made(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    context: str
    kind: str
    namespace: str | None
    name: str
    uid: str


_RECORD = TypeAdapter(list[Made])


def _path(state: StateStore, slug: str) -> Path:
    if not is_slug(slug):
        raise StateError(f"{slug!r} is not a bottle slug")
    return state.root / "kubernetes" / f"{slug}.json"


def load(state: StateStore, slug: str) -> list[Made]:
    data = state.read(_path(state, slug))
    if data is None:
        return []
    try:
        return _RECORD.validate_json(data)
    except ValidationError:
        raise StateError(f"{_path(state, slug)} is not a record bottle wrote; restore it, or remove it and the "
                         "bottle's objects by hand (`kubectl delete`), since bottle no longer knows them as its own") from None


def _save(state: StateStore, slug: str, entries: list[Made]) -> None:
    if entries:
        state.write_private(_path(state, slug), _RECORD.dump_json(entries, indent=1))
    else:
        state.remove_file(_path(state, slug))


def record(state: StateStore, slug: str, entry: Made) -> None:
    _save(state, slug, [*load(state, slug), entry])


def forget(state: StateStore, slug: str, uid: str) -> None:
    _save(state, slug, [entry for entry in load(state, slug) if entry.uid != uid])


def slugs(state: StateStore) -> list[str]:
    """The bottles with objects on record, whether or not their plan is still on disk."""
    names = state.file_names(state.root / "kubernetes")
    return [name.removesuffix(".json") for name in names if name.endswith(".json") and is_slug(name.removesuffix(".json"))]


def uids(state: StateStore) -> dict[str, str]:
    """uid -> slug for every object on record."""
    return {entry.uid: slug for slug in slugs(state) for entry in load(state, slug)}
