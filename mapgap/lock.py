"""One run per run dir: an exclusive lock taken by every CLI run and stage.

Two runs writing one run dir corrupt each other (both fetch and pack, their
reports overwrite each other, MLflow migrates one database twice), so the
second run stops with one line naming the owner instead.

- Local run dir: ``fcntl.flock`` on ``<run dir>/.mapgap.lock``. The kernel drops
  the lock when its owner dies, even on ``kill -9``, so a stale local lock
  cannot exist.
- ``s3://`` run dir: the object ``<run dir>/.mapgap.lock``, created with a
  conditional put (``If-None-Match: *``: exactly one creator wins). Its owner
  refreshes a heartbeat from a thread; a lock whose heartbeat is older than
  ``MAPGAP_LOCK_STALE_S`` seconds, or whose owner ran on this host under a pid
  that is gone, is stale and taken over.

Either way the lock file holds the owner (host, pid, since, heartbeat) and the
tag on every flow run it started (:attr:`Owner.run_tag`), so the run that takes
over a dead owner's lock can mark that owner's flow runs Crashed (see
:attr:`RunLock.previous`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from mapgap import storage

LOCK_NAME = ".mapgap.lock"


def stale_after_s() -> float:
    """Heartbeat age after which an S3 lock's owner counts as dead."""
    return float(os.environ.get("MAPGAP_LOCK_STALE_S", "120"))


class RunLockedError(RuntimeError):
    """Another live run owns the run dir (one line naming it)."""


@dataclass
class Owner:
    """Who holds a lock: what the lock file says."""

    host: str
    pid: int
    since: float  # epoch seconds
    heartbeat: float
    token: str = ""

    @property
    def run_tag(self) -> str:
        """The Prefect tag of this owner's flow runs, to find them after its death."""
        return f"mapgap-lock-{self.token[:12]}"

    @classmethod
    def me(cls) -> Owner:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)

    @classmethod
    def parse(cls, data: bytes) -> Owner | None:
        """The owner recorded in ``data``; None for an empty (released) or unreadable lock."""
        try:
            fields = json.loads(data.decode("utf-8"))
            return cls(**{k: fields[k] for k in cls.__dataclass_fields__}) if fields else None
        except (ValueError, TypeError, KeyError):
            return None

    def dump(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.since, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"pid {self.pid} on host {self.host} since {since}"

    def is_dead(self, stale_s: float) -> bool:
        """The heartbeat stopped, or the owner ran here and its pid is gone."""
        if time.time() - self.heartbeat > stale_s:
            return True
        return self.host == socket.gethostname() and not pid_alive(self.pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunLock:
    """The lock on one run dir: :meth:`acquire`, then :meth:`release` (or ``with``).

    ``previous``: the owner whose lock this one replaced without a clean release
    (its process died, or ``force`` took it); its flow runs may still say Running.
    """

    def __init__(self, run_uri: str, force: bool = False) -> None:
        self.run_uri = run_uri
        self.uri = storage.join(run_uri, LOCK_NAME)
        self.force = force
        self.owner = Owner.me()
        self.previous: Owner | None = None
        self._fd: int | None = None
        self._etag: str | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> RunLock:
        if storage.is_remote(self.uri):
            self._acquire_remote()
            self._beat = threading.Thread(target=self._heartbeat, name="mapgap-lock",
                                          daemon=True)
            self._beat.start()
        else:
            self._acquire_local()
        return self

    def release(self) -> None:
        """Give the lock back: an empty lock file / no lock object means released cleanly."""
        self._stop.set()
        with self._mutex:
            if self._fd is not None:
                os.ftruncate(self._fd, 0)
                os.close(self._fd)  # closing drops the flock
                self._fd = None
            elif self._etag is not None:
                with contextlib.suppress(OSError):  # taken over meanwhile: not ours any more
                    self._s3("delete_object", IfMatch=self._etag)
                self._etag = None

    def _locked(self, owner: Owner | None) -> RunLockedError:
        who = owner.describe() if owner else "another process (owner unknown)"
        return RunLockedError(
            f"{self.run_uri} is in use by {who}; wait for that run to finish"
            " (one run per run dir), or pass --force-unlock if it is gone")

    # local: flock -------------------------------------------------------------------------

    def _acquire_local(self) -> None:
        storage.makedirs(self.run_uri)
        forced = None
        if self.force:
            with contextlib.suppress(FileNotFoundError):
                with open(self.uri, "rb") as f:
                    forced = Owner.parse(f.read())
                os.unlink(self.uri)  # its holder keeps a lock on a file nobody opens again
        while True:
            fd = os.open(self.uri, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = Owner.parse(os.pread(fd, 1 << 20, 0))
                os.close(fd)
                raise self._locked(owner) from None
            # A --force-unlock may have replaced the file between open and flock.
            try:
                same = os.stat(self.uri).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.previous = Owner.parse(os.pread(fd, 1 << 20, 0)) or forced
        self._fd = fd
        with self._mutex:
            self._write()

    # S3: conditional put + heartbeat ------------------------------------------------------

    def _s3(self, op: str, **kwargs: Any) -> Any:
        fs, path = storage._fs(self.uri)
        bucket, key, _ = fs.split_path(path)
        return fs.call_s3(op, Bucket=bucket, Key=key, **kwargs)

    def _acquire_remote(self) -> None:
        for _ in range(3):  # another run may win a race for a stale lock: look again
            try:
                self._etag = self._s3("put_object", Body=self.owner.dump(),
                                      IfNoneMatch="*")["ETag"]
                return
            except FileExistsError:
                pass
            try:
                current = self._s3("head_object")
                fs, path = storage._fs(self.uri)
                owner = Owner.parse(fs.cat_file(path))
            except FileNotFoundError:
                continue  # released meanwhile
            age_s = time.time() - current["LastModified"].timestamp()
            dead = owner.is_dead(stale_after_s()) if owner else age_s > stale_after_s()
            if not (dead or self.force):
                raise self._locked(owner)
            with contextlib.suppress(OSError):  # changed meanwhile: the next round decides
                self._s3("delete_object", IfMatch=current["ETag"])
                self.previous = owner
        raise self._locked(None)

    def _write(self) -> None:
        """The owner record into the lock (caller holds ``_mutex``)."""
        self.owner.heartbeat = time.time()
        if self._fd is not None:
            data = self.owner.dump()
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        elif self._etag is not None:
            try:
                self._etag = self._s3("put_object", Body=self.owner.dump(),
                                      IfMatch=self._etag)["ETag"]
            except OSError:  # someone forced the lock away: stop claiming it
                self._etag = None
                storage_log(f"{self.uri}: the lock was taken over by another run")

    def _heartbeat(self) -> None:
        while not self._stop.wait(stale_after_s() / 4):
            with self._mutex:
                if self._etag is None:
                    return
                self._write()


def storage_log(message: str) -> None:
    from mapgap.progress import get_logger

    get_logger().warning(message)
