"""How DataLoader worker processes start, for training and inference alike.

Tasks run in Prefect's worker threads, next to OpenCV's and OpenMP's thread
pools: a plain fork of such a process can deadlock on a lock another thread held
(seen: mining's loader stuck in ``cv2.setNumThreads``) or die at shutdown (exit
code 1). Workers are forked from a fork server instead, a clean single-threaded
process that imports the dataset's module once, so each worker still starts in
milliseconds. As with any spawn-style start, a script that uses them needs an
``if __name__ == "__main__":`` guard (the ``mapgap`` CLI has one).
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext


def worker_context(*preload: str) -> BaseContext:
    """The fork-server context; ``preload``: modules the server imports up front."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    return ctx
