"""Prefect UI artifacts (markdown summaries, tables, progress, links).

They are published only inside a flow or task run, so the plain functions stay
usable (and testable) without Prefect.
"""

from __future__ import annotations

import re
import time
from typing import Any


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return bool(TaskRunContext.get() or FlowRunContext.get())


def artifact_key(*parts: str) -> str:
    """Prefect keys allow only lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def publish_markdown(key: str, markdown: str, description: str | None = None) -> None:
    if _in_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown, key=artifact_key(key), description=description)


def publish_table(key: str, rows: list[dict[str, Any]], description: str | None = None) -> None:
    if _in_run() and rows:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(rows, key=artifact_key(key), description=description)


def publish_link(key: str, link: str, text: str, description: str | None = None) -> None:
    if _in_run():
        from prefect.artifacts import create_link_artifact

        create_link_artifact(link, link_text=text, key=artifact_key(key), description=description)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_none_"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


class Progress:
    """A progress artifact updated at most every ``every_s`` seconds."""

    def __init__(self, key: str, total: int, description: str, every_s: float = 5.0) -> None:
        self.total, self.done, self.every_s = max(total, 1), 0, every_s
        self._last = 0.0
        self._id = None
        if _in_run():
            from prefect.artifacts import create_progress_artifact

            self._id = create_progress_artifact(0.0, key=artifact_key(key),
                                                description=description)

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self._id is not None and (now - self._last >= self.every_s or self.done >= self.total):
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._id, min(100.0, 100.0 * self.done / self.total))
            self._last = now
