import multiprocessing
import stat
import threading
import time

import pytest

from bottle.errors import BottleError
from bottle.state import StateStore, make_private_dir


def test_private_dirs_are_private_all_the_way_down(tmp_path):
    target = make_private_dir(tmp_path / "a" / "b" / "c")
    for path in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_only_directories_with_a_plan_count_as_bottles(tmp_path):
    store = StateStore(tmp_path)
    make_private_dir(store.bottle_dir("half"))
    make_private_dir(store.bottle_dir("whole"))
    (store.bottle_dir("whole") / "plan.json").write_text("{}")
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
