"""Progress for long loops: a rich bar in a terminal, periodic log lines
(``tiles 1200/5000``) everywhere, so the Prefect UI shows what is happening."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def get_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow/task, a plain logger elsewhere."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        if TaskRunContext.get() or FlowRunContext.get():
            return get_run_logger()
    except ImportError:  # pragma: no cover - prefect is a dependency
        pass
    return logging.getLogger("mapgap")


def track(items: Iterable[T], total: int, what: str, every_s: float = 10.0) -> Iterator[T]:
    """Yield ``items``; log ``<what> i/total`` at most every ``every_s`` seconds
    (and at the end), and draw a bar when stderr is a terminal."""
    log = get_logger()
    last = time.monotonic()
    bar = None
    if sys.stderr.isatty() and total > 1:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task_id = bar.add_task(what, total=total)
    try:
        for i, item in enumerate(items, 1):
            yield item
            if bar is not None:
                bar.advance(task_id)
            now = time.monotonic()
            if now - last >= every_s or i == total:
                log.info("%s %d/%d", what, i, total)
                last = now
    finally:
        if bar is not None:
            bar.stop()


class _WithoutTraceback(logging.Formatter):
    """Formats a copy of each record without its traceback, through ``inner``."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        bare = logging.makeLogRecord(record.__dict__)
        bare.exc_info = bare.exc_text = bare.stack_info = None
        return self.inner.format(bare)


def hide_console_tracebacks() -> None:
    """Keep tracebacks out of the terminal: a failed run ends with one ``error:``
    line. The Prefect UI log still gets them (its API handler is left as is)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    names = list(logging.root.manager.loggerDict)
    for logger in [logging.getLogger(), *map(logging.getLogger, names)]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(
                    handler.formatter, _WithoutTraceback):
                handler.setFormatter(_WithoutTraceback(handler.formatter))
