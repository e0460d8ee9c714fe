"""One driver per experiment, one trainer per stage-I key.

A search or an ablation first takes its experiment (`hold_experiment`: `<storage>/<name>.lock`);
a second driver on the same experiment stops at once (ExperimentHeld, exit 2) naming who holds
it. A shared stage I takes its key in the cache (`hold_key`: `<cache>/<key>.lock`) and a second
trainer of the same key waits for the first, then finds the entry done (or continues its
partial checkpoint, if the first died).

- On a local or NFS path the lock is the OS's (fcntl.flock, which Linux maps to POSIX locks
  on NFS): it dies with its holder, whatever kills it. The file names the holder; a release
  removes it (and the empty folders its acquire made), a killed holder leaves it, harmless.
- On object storage (any other URI) it is a lease file with a heartbeat every HEARTBEAT_S:
  a lease whose heartbeat is older than STALE_HEARTBEATS of them is stale (its holder died)
  and is taken over, with a warning.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from ..trainer import storage
from ..trainer.errors import ConfigError

HEARTBEAT_S = 30.0
STALE_HEARTBEATS = 4
WAIT_POLL_S = 5.0  # how often a waiting trainer looks again at a lease


class ExperimentHeld(ConfigError):
    """Another driver runs this experiment (exit 2: the command is fine, its timing is not)."""


def holder_info(argv=None) -> dict:
    return dict(host=socket.gethostname(), pid=os.getpid(), since=time.time(),
                command=" ".join(sys.argv if argv is None else argv))


def describe_holder(info: dict | None) -> str:
    """'host h1, pid 123, since 2026-12-03 16:50:01 UTC' (or what the lock file still says)."""
    if not info:
        return "holder unknown (it is starting)"
    since = datetime.fromtimestamp(info.get("since", 0), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, since {since}"


class FileLock:
    """fcntl.flock on a local or NFS file, held as long as the file stays open. Released, the file
    and the folders its acquire created are removed (a refused driver leaves nothing behind); a
    waiter that got the lock of a file removed meanwhile takes the new one (`_locked_current`)."""

    def __init__(self, path: str):
        self.path, self.fd, self.created = Path(path), None, []

    def acquire(self, wait: bool = False) -> dict | None:
        """None when this process now holds it; else (wait=False) the holder's info."""
        import fcntl
        while True:
            self._make_parent()
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # its folder was just removed by a releasing holder
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return self.read() or {}
            if self._locked_current(fd):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
        self.fd = fd
        return None

    def _make_parent(self) -> None:
        missing = []
        folder = self.path.parent
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.created = self.created or missing  # deepest first

    def _locked_current(self, fd: int) -> bool:
        """Whether the file locked is still the one at self.path (not one a holder removed)."""
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.fd is None:
            return
        if self._locked_current(self.fd):
            self.path.unlink(missing_ok=True)  # while still held: a waiter then retries on a new file
        os.close(self.fd)  # closing the file drops the lock
        self.fd = None
        for folder in self.created:  # only the empty ones this lock made
            try:
                folder.rmdir()
            except OSError:
                break
        self.created = []


class Lease:
    """A lease file on object storage: {host, pid, since, heartbeat, token}, renewed by a thread."""

    def __init__(self, uri: str):
        self.uri, self.token, self._stop = uri, uuid.uuid4().hex, threading.Event()
        self._thread, self.info = None, None

    def read(self) -> dict | None:
        try:
            return json.loads(storage.read_text(self.uri) or "null")
        except ValueError:
            return None

    def acquire(self, wait: bool = False) -> dict | None:
        while True:
            holder = self._try()
            if holder is None or not wait:
                return holder
            time.sleep(WAIT_POLL_S)

    def _try(self) -> dict | None:
        current = self.read()
        if current is not None:
            age = time.time() - current.get("heartbeat", 0)
            if age < STALE_HEARTBEATS * HEARTBEAT_S:
                return current
            print(f"warning: taking over the stale lease {self.uri} ({describe_holder(current)}; last heartbeat "
                  f"{age:.0f} s ago, more than {STALE_HEARTBEATS} heartbeats)", file=sys.stderr)
        self.info = {**holder_info(), "token": self.token}
        self._write()
        time.sleep(min(1.0, HEARTBEAT_S / 10))  # a rival who wrote at the same time: the last writer wins
        current = self.read()
        if not current or current.get("token") != self.token:
            return current or {}
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lease {self.uri}")
        self._thread.start()
        return None

    def _write(self) -> None:
        storage.write_text(self.uri, json.dumps({**self.info, "heartbeat": time.time()}))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            current = self.read()
            if current and current.get("token") != self.token:
                print(f"warning: the lease {self.uri} was taken over by {describe_holder(current)}: this "
                      f"process's heartbeat stalled for more than {STALE_HEARTBEATS} heartbeats", file=sys.stderr)
                return
            self._write()

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        current = self.read()
        if current and current.get("token") == self.token:
            storage.delete_file(self.uri)


def lock_for(uri: str) -> FileLock | Lease:
    """The OS's lock for a path (file:// included), a lease for any other URI."""
    if uri.startswith("file://"):
        return FileLock(uri[len("file://"):])
    return Lease(uri) if "://" in uri else FileLock(uri)


def experiment_lock_uri(storage_root: str, name: str) -> str:
    return f"{storage_root.rstrip('/')}/{name}.lock"


@contextlib.contextmanager
def hold_experiment(storage_root: str, name: str):
    """Take the experiment <storage>/<name> for this driver, or raise ExperimentHeld naming the holder."""
    lock = lock_for(experiment_lock_uri(storage_root, name))
    holder = lock.acquire()
    if holder is not None:
        raise ExperimentHeld(f"the experiment {storage_root.rstrip('/')}/{name} is being run by another driver "
                             f"({describe_holder(holder)}): wait for it to finish, or pass another --name")
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def hold_key(uri: str):
    """Hold the lock at `uri`, waiting for whoever holds it now."""
    lock = lock_for(uri)
    lock.acquire(wait=True)
    try:
        yield
    finally:
        lock.release()
