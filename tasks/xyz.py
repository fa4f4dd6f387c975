"""Fetch XYZ/TMS tiles from a tile server (http/https) or a tile folder (local
path, ``file://``, ``s3://``) into the run's tile store.

Tiles are fetched by a bounded pool of threads sharing one keep-alive httpx
client; decoding, the blank check and the rare re-encoding happen in the same
threads (OpenCV and numpy release the GIL), so network waits and pixel work
overlap. Most tiles are stored as the server sent them (see
:func:`~mapgap.tasks.tilestore.keep_as_is`). Transient errors (429, 5xx,
timeouts, dropped connections) are retried with capped exponential backoff; a
tile that still fails is recorded in the fetch report and the run goes on. Only
a server that cannot be reached at all stops the batch, with one clear line.

An API key (``imagery.api_key_env``) is substituted into the template and
headers at request time only: messages and reports show the template, and any
error text passes through :meth:`TileTemplate.redact`.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from typing import Literal

import httpx
import mercantile
import numpy as np

from mapgap import storage
from mapgap.conf.imagery import ImageryConfig
from mapgap.grid import Tile, children, tile_key
from mapgap.progress import get_logger, track
from mapgap.tasks.decode import (
    Decoded,
    OversizedTile,
    UndecodableTile,
    decode_tile,
    fit_mask,
    fit_to_size,
)
from mapgap.tasks.tilestore import FetchReport, ImageryError, TileStore

USER_AGENT = f"mapgap/{metadata.version('mapgap')} (imagery fetch)"
_MISSING_STATUS = frozenset({204, 404, 410})
# Images up to 4x the expected side (16x the pixels) are resampled; larger ones are
# refused from their header, before decoding.
MAX_SIDE_FACTOR = 4


@dataclass(frozen=True)
class TileTemplate:
    """A tile URL or path template: ``{z} {x} {y} {-y} {q} {s} {key}``."""

    template: str
    subdomains: Sequence[str] = ("a", "b", "c")
    api_key: str | None = None

    @classmethod
    def from_config(cls, imagery: ImageryConfig) -> TileTemplate:
        """The config checked {key} against api_key_env at load; the variable
        itself is read here, in the process that fetches."""
        key = None
        if imagery.api_key_env:
            key = os.environ.get(imagery.api_key_env)
            if not key:
                raise ImageryError(
                    f"imagery.api_key_env: environment variable {imagery.api_key_env} is not set"
                )
        return cls(imagery.source, tuple(imagery.subdomains), key)

    @property
    def is_http(self) -> bool:
        return self.template.startswith(("http://", "https://"))

    def fill(self, text: str) -> str:
        """Substitute the API key (for header values)."""
        return text.replace("{key}", self.api_key) if self.api_key else text

    def url(self, tile: Tile) -> str:
        t = self.template
        if "{-y}" in t:
            t = t.replace("{-y}", str(2**tile.z - 1 - tile.y))
        if "{q}" in t:
            t = t.replace("{q}", mercantile.quadkey(tile))
        if "{s}" in t:
            t = t.replace("{s}", self.subdomains[(tile.x + tile.y) % len(self.subdomains)])
        t = t.replace("{z}", str(tile.z)).replace("{x}", str(tile.x)).replace("{y}", str(tile.y))
        return self.fill(t)

    def redact(self, text: str) -> str:
        """``text`` with the API key masked (for anything logged or reported)."""
        return text.replace(self.api_key, "***") if self.api_key else text

    @property
    def local_folder(self) -> str | None:
        """The tile folder of a local template (its path before the first
        placeholder); None for http(s) and object stores."""
        if self.is_http or storage.is_remote(self.template):
            return None
        static = self.template.removeprefix("file://").split("{", 1)[0]
        return static if static.endswith("/") else os.path.dirname(static)

    def check_local(self) -> None:
        """A tile folder that does not exist is a config mistake, not 'all tiles missing'."""
        folder = self.local_folder
        if folder and not os.path.isdir(folder):
            raise ImageryError(f"{self.template}: tile folder {folder} does not exist")

    def escapes_folder(self, path: str) -> str | None:
        """Why a local tile file may not be read, or None: a symlink (anywhere on
        its path) that leads out of the tile folder would copy any file the user
        can read (``/etc/passwd``, keys) into the run and its reports."""
        folder = self.local_folder
        if not folder:
            return None
        real, root = os.path.realpath(path), os.path.realpath(folder)
        if os.path.commonpath([real, root]) == root:
            return None
        return f"{path}: a symlink to outside the tile folder {folder}: refused"


class _RedactKeys(logging.Filter):
    """httpx logs every request URL (INFO): mask the API keys in place."""

    keys: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.keys:
            msg = record.getMessage()
            for key in self.keys:
                msg = msg.replace(key, "***")
            record.msg, record.args = msg, ()
        return True


_REDACT = _RedactKeys()
for _name in ("httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2"):
    logging.getLogger(_name).addFilter(_REDACT)


Kind = Literal["ok", "missing", "failed"]


@dataclass(frozen=True)
class Response:
    kind: Kind
    data: bytes = b""
    reason: str = ""
    attempts: int = 1
    transient: str = ""  # last transient error before success (for the report)
    reached: bool = True  # False: never got an HTTP answer (connection errors only)


@dataclass(frozen=True)
class RetryPolicy:
    retries: int
    backoff_s: float
    max_backoff_s: float

    def wait(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before retry ``attempt`` (1-based): exponential with jitter, or
        the server's Retry-After, capped either way."""
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        return min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s) * random.uniform(0.5, 1)


_SSL_LOCK = threading.Lock()
_SSL_CONTEXTS: dict[tuple[str, str], ssl.SSLContext] = {}


def _ssl_context() -> ssl.SSLContext:
    """httpx's default verifying context, built once per process (and per
    SSL_CERT_FILE / SSL_CERT_DIR): loading the CA bundle takes 50-300 ms, which
    every batch's client would otherwise pay again, even for plain http."""
    key = (os.environ.get("SSL_CERT_FILE", ""), os.environ.get("SSL_CERT_DIR", ""))
    with _SSL_LOCK:
        if key not in _SSL_CONTEXTS:
            _SSL_CONTEXTS[key] = httpx.create_ssl_context()
        return _SSL_CONTEXTS[key]


def _retry_after(headers: httpx.Headers) -> float | None:
    try:
        return max(0.0, float(headers.get("Retry-After", "")))
    except ValueError:  # absent, or an HTTP date: use our own backoff
        return None


class Fetcher:
    """Gets raw tile bytes with retries; thread-safe; stops the batch when the
    server is unreachable (``concurrency`` tiles in a row never got an answer)."""

    def __init__(
        self, template: TileTemplate, imagery: ImageryConfig, unreachable_after: int
    ) -> None:
        self.template = template
        self.policy = RetryPolicy(imagery.retries, imagery.backoff_s, imagery.max_backoff_s)
        self.unreachable_after = max(1, unreachable_after)
        self._unanswered = 0
        self._lock = threading.Lock()
        self.client: httpx.Client | None = None
        if template.is_http:
            if template.api_key:
                _REDACT.keys.add(template.api_key)
            headers = {"User-Agent": USER_AGENT}
            headers.update({k: template.fill(v) for k, v in imagery.headers.items()})
            self.client = httpx.Client(
                headers=headers,
                timeout=httpx.Timeout(imagery.timeout_s),
                limits=httpx.Limits(
                    max_connections=imagery.concurrency,
                    max_keepalive_connections=imagery.concurrency,
                ),
                follow_redirects=True,
                verify=_ssl_context(),
            )

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def get(self, tile: Tile) -> Response:
        url = self.template.url(tile)
        resp = self._http(url) if self.client is not None else self._read(url)
        if self.client is not None:
            self._note_reached(resp)
        return resp

    def _note_reached(self, resp: Response) -> None:
        with self._lock:
            self._unanswered = 0 if resp.reached else self._unanswered + 1
            dead = self._unanswered >= self.unreachable_after
        if dead:
            raise ImageryError(
                f"tile server unreachable: {self.template.template} ({resp.reason})"
            )

    def _read(self, path: str) -> Response:
        path = path.removeprefix("file://")
        refused = self.template.escapes_folder(path)
        if refused:
            return Response("failed", reason=refused)
        try:
            data = storage.read_bytes(path)
        except storage.StorageError:
            return Response("missing", reason="no such file")
        except OSError as err:
            return Response("failed", reason=self.template.redact(f"cannot read ({err})"))
        if not data:
            return Response("missing", reason="empty file")
        return Response("ok", data)

    def _http(self, url: str) -> Response:
        assert self.client is not None
        transient, reached, retry_after = "", False, None
        attempts = self.policy.retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.policy.wait(attempt, retry_after))
            retry_after = None
            try:
                r = self.client.get(url)
            except httpx.TimeoutException as err:
                transient = f"timeout ({type(err).__name__})"
                reached = reached or not isinstance(err, httpx.ConnectTimeout)
                continue
            except httpx.TransportError as err:
                transient = self.template.redact(f"{type(err).__name__}: {err}")
                continue
            reached = True
            if r.status_code == 200 and r.content:
                return Response("ok", r.content, attempts=attempt + 1, transient=transient)
            if r.status_code in _MISSING_STATUS or r.status_code == 200:
                what = "empty body" if r.status_code == 200 else f"HTTP {r.status_code}"
                return Response("missing", reason=what, attempts=attempt + 1)
            if r.status_code == 429 or r.status_code >= 500:
                transient, retry_after = f"HTTP {r.status_code}", _retry_after(r.headers)
                continue
            return Response("failed", reason=f"HTTP {r.status_code}", attempts=attempt + 1)
        return Response(
            "failed",
            reason=f"{transient} after {attempts} attempt{'s' * (attempts > 1)}",
            attempts=attempts,
            reached=reached,
        )


@dataclass(frozen=True)
class Fetched:
    kind: Kind
    decoded: Decoded | None = None
    raw: bytes = b""
    reason: str = ""


class _ResampleWarning:
    """Warns once per process (= once per run with the thread runner) for each
    source and image size that must be resampled to the tile grid: a server
    sending 1x1 or 512 px images is worth knowing about, not worth 10,000 lines."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, tuple[int, int], int]] = set()
        self._lock = threading.Lock()

    def __call__(self, template: str, shape: tuple[int, int], size: int) -> None:
        key = (template, shape, size)
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
        get_logger().warning(
            "imagery: %s sends %dx%d px tiles; resampling them to %d px (warned once)",
            template, shape[1], shape[0], size)


_warn_resampled = _ResampleWarning()


def _fetch_decoded(fetcher: Fetcher, source: Tile, report: FetchReport, tile: Tile,
                   size: int) -> Fetched:
    """Fetch and decode ``source`` (``tile`` itself or one of its children),
    whose pixels should be ``size`` px square."""
    resp = fetcher.get(source)
    if resp.kind != "ok":
        return Fetched(resp.kind, reason=resp.reason)
    if resp.transient:
        where = "" if source == tile else f"child {tile_key(source)}: "
        report.add("retried", tile, where + resp.transient, attempts=resp.attempts)
    try:
        decoded = decode_tile(resp.data, max_pixels=(MAX_SIDE_FACTOR * size) ** 2)
    except OversizedTile as err:
        return Fetched("failed", reason=f"too large: {err}")
    except UndecodableTile as err:
        return Fetched("failed", reason=f"undecodable: {err}")
    if decoded.shape != (size, size) and decoded.shape[0] == decoded.shape[1]:
        _warn_resampled(fetcher.template.template, decoded.shape, size)
    return Fetched("ok", decoded, resp.data)


def fetch_one(fetcher: Fetcher, tile: Tile, store: TileStore, report: FetchReport) -> None:
    got = _fetch_decoded(fetcher, tile, report, tile, store.tile_size)
    if got.decoded is not None:
        store.save_source(tile, got.raw, got.decoded, report)
    else:
        report.add("failures" if got.kind == "failed" else "missing", tile, got.reason)


def fetch_overzoomed(fetcher: Fetcher, tile: Tile, store: TileStore, report: FetchReport) -> None:
    """One tile from its 4 children at zoom + 1 (a missing child leaves a blank quarter)."""
    size, half = store.tile_size, store.tile_size // 2
    rgb = np.zeros((size, size, 3), np.uint8)
    valid = np.zeros((size, size), bool)
    found = 0
    for i, child in enumerate(children(tile, tile.z + 1)):  # row-major: sorted by (y, x)
        got = _fetch_decoded(fetcher, child, report, tile, half)
        if got.kind == "missing":
            continue
        if got.decoded is None or got.decoded.shape[0] != got.decoded.shape[1]:
            reason = got.reason or "not a square tile"
            report.add("failures", tile, f"child {tile_key(child)}: {reason}")
            return
        rows = slice((i // 2) * half, (i // 2 + 1) * half)
        cols = slice((i % 2) * half, (i % 2 + 1) * half)
        rgb[rows, cols] = fit_to_size(got.decoded.rgb, half)
        child_valid = fit_mask(got.decoded.valid, half)
        valid[rows, cols] = True if child_valid is None else child_valid
        found += 1
    if not found:
        report.add("missing", tile, "no child tile at zoom + 1")
        return
    store.save(tile, rgb, None if valid.all() else valid, report)


def fetch_xyz(tiles: Sequence[Tile], imagery: ImageryConfig, store: TileStore) -> FetchReport:
    """Fetch ``tiles`` not yet in ``store``; returns this batch's report."""
    template = TileTemplate.from_config(imagery)
    template.check_local()
    report = FetchReport()
    existing = store.existing(tiles)
    report.skipped_existing = len(existing)
    todo = [t for t in tiles if t not in existing]
    if not todo:
        return report
    work = fetch_overzoomed if imagery.overzoom else fetch_one
    fetcher = Fetcher(template, imagery, unreachable_after=min(imagery.concurrency, len(todo)))
    pool = ThreadPoolExecutor(imagery.concurrency, thread_name_prefix="fetch")
    try:
        futures = [pool.submit(work, fetcher, t, store, report) for t in todo]
        for fut in track(futures, len(futures), "tiles"):
            fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        fetcher.close()
    return report
