"""Issue 18, item 1: one driver per experiment (an OS lock on a path, a lease on object storage),
and one trainer per shared stage-I key. Nothing here starts Ray."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from risda.runner import lock
from risda.runner.lock import ExperimentHeld, FileLock, Lease, hold_experiment, hold_key


def test_a_second_driver_is_refused_naming_the_holder(tmp_path):
    with hold_experiment(str(tmp_path), "exp"):
        with pytest.raises(ExperimentHeld) as e:
            with hold_experiment(str(tmp_path), "exp"):
                pass
        text = str(e.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}, since 20" in text and "UTC" in text
        assert "wait for it to finish, or pass another --name" in text and "\n" not in text
        with hold_experiment(str(tmp_path), "other"):  # another --name is free
            pass
    with hold_experiment(str(tmp_path), "exp"):  # released at the end
        pass


def test_the_os_lock_dies_with_its_holder(tmp_path):
    path = tmp_path / "exp.lock"
    holder = subprocess.Popen([sys.executable, "-c", f"from risda.runner.lock import FileLock; import time; "
                               f"FileLock({str(path)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        info = FileLock(str(path)).acquire()
        assert info is not None and info["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    mine = FileLock(str(path))
    assert mine.acquire() is None  # SIGKILL ran no clean-up, yet the lock is free
    mine.release()


@pytest.mark.parametrize("runner", ["search", "ablation"])
def test_a_second_driver_exits_2_with_one_line_before_ray_starts(cifar10_root, tmp_path, capsys, monkeypatch, runner):
    import ray
    storage = tmp_path / "ray_results"
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    flags = ["--storage", str(storage), "--name", "exp", "--results", str(tmp_path / "res"), "--dataset", "cifar10lt",
             "--data-root", str(cifar10_root), "--epochs", "2", "--n-max", "50", "--test-per-class", "10"]
    with hold_experiment(str(storage), "exp"):
        capsys.readouterr()
        if runner == "search":
            from risda.runner.search import main
            rc = main(flags + ["--num-samples", "1"])
        else:
            from risda.runner.ablation.cli import main
            rc = main(flags + ["--arms", "ce", "--seeds", "0", "--imbalance", "10"])
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.startswith("error:")]
    assert rc == 2, out
    assert len(lines) == 1 and f"pid {os.getpid()}" in lines[0] and "another --name" in lines[0], out


def test_a_lease_on_object_storage_is_held_renewed_and_released(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.2)
    uri = f"file://{tmp_path}/exp.lease"  # any URI goes through pyarrow; file:// takes the lease code path here
    first, second = Lease(uri), Lease(uri)
    assert first.acquire() is None
    beat = first.read()["heartbeat"]
    assert second.acquire()["token"] == first.token  # held: the holder's info comes back
    time.sleep(0.5)
    assert first.read()["heartbeat"] > beat  # the heartbeat renews it
    first.release()
    assert not (tmp_path / "exp.lease").exists()
    assert second.acquire() is None
    second.release()


def test_a_stale_lease_is_taken_over_with_a_warning(tmp_path, capsys):
    path = tmp_path / "exp.lease"
    dead = dict(host="gone", pid=1, since=0, heartbeat=time.time() - 10 * lock.HEARTBEAT_S, token="old")
    path.write_text(json.dumps(dead))
    mine = Lease(f"file://{path}")
    assert mine.acquire() is None
    assert "taking over the stale lease" in capsys.readouterr().err and mine.read()["token"] == mine.token
    mine.release()


def test_lock_for_picks_the_os_lock_for_paths(tmp_path):
    assert isinstance(lock.lock_for(str(tmp_path / "a.lock")), FileLock)
    assert isinstance(lock.lock_for(f"file://{tmp_path}/a.lock"), FileLock)
    assert isinstance(lock.lock_for("s3://bucket/a.lock"), Lease)


def test_a_second_trainer_of_a_stage1_key_waits_for_the_first(tmp_path):
    """What train_stage1_trial does around its key: the second waits, then finds the entry."""
    key_lock, entry = str(tmp_path / "key.lock"), tmp_path / "key" / "stage1.json"
    found = []

    def second_trainer():
        with hold_key(key_lock):
            found.append(entry.exists())

    with hold_key(key_lock):
        t = threading.Thread(target=second_trainer)
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and not found  # waiting, not training
        entry.parent.mkdir()
        entry.write_text("{}")  # the first stores its stage I
    t.join(10)
    assert found == [True]


def test_a_released_lock_leaves_no_file_and_no_folder_it_made(tmp_path):
    """Issue 25: a refused driver left `<storage>/<name>.lock` (and the storage folder) behind."""
    (tmp_path / "kept").mkdir()
    with hold_experiment(str(tmp_path / "kept" / "new" / "ray_results"), "exp"):
        assert (tmp_path / "kept" / "new" / "ray_results" / "exp.lock").is_file()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]  # the folders it made are gone, the old one kept


def test_a_waiter_on_a_removed_lock_file_takes_the_new_one(tmp_path):
    """A waiter that opened the lock file before its holder removed it must not hold a lock on the
    removed file while a third process takes the new one."""
    path = str(tmp_path / "k.lock")
    first = FileLock(path)
    assert first.acquire() is None
    got = []
    waiter = threading.Thread(target=lambda: got.append(FileLock(path).acquire(wait=True)))
    waiter.start()
    time.sleep(0.3)
    first.release()
    waiter.join(10)
    assert got == [None] and os.path.exists(path)  # the waiter holds the file now at the path
    assert FileLock(path).acquire() is not None  # and a third is refused
