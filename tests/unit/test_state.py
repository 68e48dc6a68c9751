import multiprocessing
import os
import stat
import threading
import time

import pytest

from bottle.errors import BottleError, StateError
from bottle.state import StateStore


@pytest.fixture
def umask_zero():
    old = os.umask(0)
    yield
    os.umask(old)


def modes(root):
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


def test_private_dirs_are_private_all_the_way_down(tmp_path):
    store = StateStore(tmp_path / "a" / "home")
    target = store.private_dir(store.root / "b" / "c")
    for path in (tmp_path / "a", store.root, store.root / "b", target):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_every_path_bottle_makes_has_its_mode_whatever_the_umask(tmp_path, umask_zero):
    store = StateStore(tmp_path / "home")
    store.write_private(store.bottle_dir("b") / "bundle" / "secrets.json", b"{}")
    store.private_dir(store.cache_dir() / "artifacts")
    store.owner(create=True)
    with store.lock("b"):
        pass
    found = modes(store.root)
    assert found == {k: 0o700 for k in found if (store.root / k).is_dir()} | {
        "bottles/b/bundle/secrets.json": 0o600, "owner": 0o600, "locks/b.lock": 0o600,
    }  # fmt: skip


def test_the_file_is_never_readable_by_others_while_being_written(tmp_path, mocker, umask_zero):
    seen = []
    real_fdopen = os.fdopen

    def spy(fd, *args, **kwargs):
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_fdopen(fd, *args, **kwargs)

    mocker.patch("bottle.state.os.fdopen", side_effect=spy)
    StateStore(tmp_path).write_private(tmp_path / "Smolfile", b"env = []\n")
    assert seen == [0o600]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, mocker):
    store, path = StateStore(tmp_path), tmp_path / "Smolfile"
    store.write_private(path, b"old")
    mocker.patch("bottle.state.os.replace", side_effect=OSError(28, "No space left on device"))
    with pytest.raises(StateError, match=f"cannot write {path}: No space left on device"):
        store.write_private(path, b"new")
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("planted", ["bottles", "bottles/b", "bottles/b/bundle", "bottles/b/guest", "locks"])
def test_a_planted_directory_link_is_refused_and_its_target_untouched(tmp_path, planted):
    store, target = StateStore(tmp_path / "home"), tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    link = store.root / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    with pytest.raises(StateError, match=f"{link} is a symbolic link, .* never follows links"):
        if planted == "locks":
            with store.lock("b"):
                pass
        else:
            store.write_private(store.bottle_dir("b") / "bundle" / "secrets.json", b"secret")
            store.write_private(store.bottle_dir("b") / "guest" / "ca.pem", b"cert")
    assert list(target.iterdir()) == [] and stat.S_IMODE(target.stat().st_mode) == 0o755


def test_a_planted_file_link_is_replaced_never_written_through(tmp_path):
    store, target = StateStore(tmp_path / "home"), tmp_path / "victim"
    target.write_text("keep")
    store.private_dir(store.bottle_dir("b"))
    (store.bottle_dir("b") / "plan.json").symlink_to(target)
    with pytest.raises(StateError, match="symbolic link"):
        store.read(store.bottle_dir("b") / "plan.json")
    store.write_private(store.bottle_dir("b") / "plan.json", b"{}")
    assert target.read_text() == "keep" and not (store.bottle_dir("b") / "plan.json").is_symlink()


def test_a_planted_lock_link_is_refused(tmp_path):
    store, target = StateStore(tmp_path / "home"), tmp_path / "victim"
    target.write_text("keep")
    store.private_dir(store.root / "locks")
    (store.root / "locks" / "b.lock").symlink_to(target)
    with pytest.raises(StateError, match="symbolic link"):
        with store.lock("b"):
            pass
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_removing_a_linked_bottle_directory_is_refused_and_the_target_kept(tmp_path):
    store, target = StateStore(tmp_path / "home"), tmp_path / "victim"
    target.mkdir()
    (target / "precious").write_text("keep")
    store.private_dir(store.root / "bottles")
    store.bottle_dir("b").symlink_to(target)
    with pytest.raises(StateError, match="symbolic link"):
        store.remove_bottle("b")
    assert (target / "precious").read_text() == "keep"
    assert store.slugs() == []


@pytest.mark.parametrize("slug", ["../../..", "..", "a/b", "", "A", "-a", "a--b", "x" * 41, "a\nb"])
def test_what_is_not_a_slug_never_becomes_a_path(tmp_path, slug):
    store = StateStore(tmp_path / "home")
    for call in (store.bottle_dir, store.remove_bottle, store.read_plan_data):
        with pytest.raises(StateError, match="not a bottle slug"):
            call(slug)
    with pytest.raises(StateError, match="not a bottle slug"):
        with store.lock(slug):
            pass


def test_paths_outside_the_root_are_refused(tmp_path):
    store = StateStore(tmp_path / "home")
    for path in (tmp_path / "other" / "file", store.root / ".." / "file"):
        with pytest.raises(StateError, match="outside bottle's state directory"):
            store.write_private(path, b"x")


def test_the_owner_id_is_made_once_and_kept(tmp_path):
    store = StateStore(tmp_path / "home")
    assert store.owner() is None and not store.root.exists()
    made = store.owner(create=True)
    assert len(made) == 32 and StateStore(tmp_path / "home").owner(create=True) == made
    assert StateStore(tmp_path / "other").owner(create=True) != made
    assert sorted(p.name for p in store.root.iterdir()) == ["owner"]


def test_a_damaged_owner_file_is_an_error_not_a_new_owner(tmp_path):
    store = StateStore(tmp_path / "home")
    store.write_private(store.root / "owner", b"../../etc")
    with pytest.raises(StateError, match="not an owner id bottle wrote"):
        store.owner(create=True)


def test_only_directories_with_a_plan_count_as_bottles(tmp_path):
    store = StateStore(tmp_path)
    store.private_dir(store.bottle_dir("half"))
    store.write_private(store.bottle_dir("whole") / "plan.json", b"{}")
    (store.root / "bottles" / "Not-A-Slug").mkdir()
    (store.root / "bottles" / "Not-A-Slug" / "plan.json").write_text("{}")
    assert store.slugs() == ["whole"]
    assert store.remove_bottle("whole") == store.bottle_dir("whole")
    assert store.remove_bottle("whole") is None


def test_a_second_holder_waits_for_the_lock(tmp_path):
    store = StateStore(tmp_path)
    order, waited = [], threading.Event()

    def second():
        with store.lock("b", on_wait=waited.set):
            order.append("second")

    with store.lock("b"):
        thread = threading.Thread(target=second)
        thread.start()
        assert waited.wait(5)
        order.append("first")
    thread.join(5)
    assert order == ["first", "second"]


def test_locks_are_per_bottle(tmp_path):
    store = StateStore(tmp_path)
    with store.lock("a"), store.lock("b", timeout=0):
        pass


def _hold(root, ready, release):
    with StateStore(root).lock("b"):
        ready.set()
        release.wait(10)


def test_a_lock_held_by_another_process_times_out_with_a_sentence(tmp_path):
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        started = time.monotonic()
        with pytest.raises(BottleError, match="another bottle command has been working on 'b'"):
            with StateStore(tmp_path).lock("b", timeout=0.3):
                pass
        assert time.monotonic() - started < 5
    finally:
        release.set()
        holder.join(10)


def test_a_dead_holder_releases_the_lock(tmp_path):
    holder = multiprocessing.Process(target=_hold, args=(tmp_path, multiprocessing.Event(), multiprocessing.Event()))
    holder.start()
    time.sleep(0.5)
    holder.kill()
    holder.join(10)
    with StateStore(tmp_path).lock("b", timeout=2):
        pass
