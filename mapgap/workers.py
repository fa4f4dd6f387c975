"""How DataLoader worker processes start, for training and inference alike.

Tasks run in Prefect's worker threads, next to OpenCV's and OpenMP's thread
pools: a plain fork of such a process can deadlock on a lock another thread held
(seen: mining's loader stuck in ``cv2.setNumThreads``) or die at shutdown (exit
code 1). Workers are forked from a fork server instead, a clean single-threaded
process that imports the dataset's module once, so each worker still starts in
milliseconds. As with any spawn-style start, a script that uses them needs an
``if __name__ == "__main__":`` guard (the ``mapgap`` CLI has one).

A run that is stopped must stop these processes too: :func:`descendants` and
:func:`stop_processes`.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from multiprocessing.context import BaseContext
from pathlib import Path


def worker_context(*preload: str) -> BaseContext:
    """The fork-server context; ``preload``: modules the server imports up front."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    return ctx


def descendants(pid: int | None = None) -> list[int]:
    """Every live process below ``pid`` (default: this one), parents first.

    Read from /proc (Linux); elsewhere the list is empty.
    """
    root = pid or os.getpid()
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
        except OSError:  # exited meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.parent.name))
    found: list[int] = []
    todo = [root]
    while todo:
        kids = children.get(todo.pop(0), [])
        found += kids
        todo += kids
    return found


def stop_processes(pids: list[int], grace_s: float = 3.0) -> None:
    """SIGTERM ``pids``, SIGKILL whatever still runs after ``grace_s``, reap our children.

    Without this a stopped run leaves its fork server and DataLoader workers
    running, re-parented to PID 1.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _running(p)]
            time.sleep(0.05)
        if not pids:
            return


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie child of ours is reaped here)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
