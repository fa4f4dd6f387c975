"""A small real XYZ tile server on 127.0.0.1, for the offline demo, tests and
benchmarks.

It serves a folder of tiles through a file-name pattern (``{z}/{x}/{y}.png``,
or Kampala's flat ``OAM-{x}-{y}-{z}.png``) under a URL pattern that may differ
(``tms/{z}/{x}/{-y}.png``, ``q/{q}.jpg``, ``{s}/{z}/{x}/{y}.png``), with HTTP/1.1
keep-alive like a real tile server. Per-tile :class:`Fault` s reproduce what real
servers do wrong: 404s, 5xx or 429 bursts, slow answers, garbage bytes.

    with TileServer("tiles", "{z}/{x}/{y}.png") as server:
        fetch(server.url_template)

``python -m mapgap.tileserver DIR [PATTERN]`` serves a folder until interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import mercantile

from mapgap.grid import Tile
from mapgap.tasks.decode import sniff_format

_TOKENS = {
    "{z}": r"(?P<z>\d+)",
    "{x}": r"(?P<x>\d+)",
    "{y}": r"(?P<y>\d+)",
    "{-y}": r"(?P<tms_y>\d+)",
    "{q}": r"(?P<q>[0-3]+)",
    "{s}": r"(?P<s>[^/]+)",
}
_CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclass(frozen=True)
class Fault:
    """How to misbehave for one tile. ``times``: only for the first N requests of
    that tile (then serve it normally); None: every time."""

    status: int | None = None
    times: int | None = None
    delay_s: float = 0.0
    body: bytes | None = None
    retry_after: float | None = None

    @classmethod
    def not_found(cls) -> Fault:
        return cls(status=404)

    @classmethod
    def error(cls, status: int = 500, times: int | None = 1) -> Fault:
        return cls(status=status, times=times)

    @classmethod
    def rate_limited(cls, times: int | None = 1, retry_after: float = 0.0) -> Fault:
        return cls(status=429, times=times, retry_after=retry_after)

    @classmethod
    def slow(cls, delay_s: float, times: int | None = None) -> Fault:
        return cls(delay_s=delay_s, times=times)

    @classmethod
    def garbage(cls, body: bytes = b"<html><body>Service temporarily unavailable</body></html>"
                ) -> Fault:
        return cls(body=body)


class Request(NamedTuple):
    path: str  # with the query string
    headers: dict[str, str]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\{-?[a-z]\})", pattern)
    out = "".join(_TOKENS.get(p, re.escape(p)) for p in parts)
    return re.compile(f"^/{out}$")


def _tile_from_match(m: re.Match[str]) -> Tile:
    g = m.groupdict()
    if g.get("q"):
        return mercantile.quadkey_to_tile(g["q"])
    z = int(g["z"])
    y = int(g["y"]) if g.get("y") is not None else 2**z - 1 - int(g["tms_y"])
    return Tile(int(g["x"]), y, z)


class TileServer:
    """Serve ``directory`` (files named by ``pattern``) at ``url_template``."""

    def __init__(
        self,
        directory: str | Path,
        pattern: str = "{z}/{x}/{y}.png",
        faults: Mapping[Tile, Fault] | None = None,
        url_pattern: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.directory = Path(directory)
        self.pattern = pattern
        self.url_pattern = (url_pattern or pattern).lstrip("/")
        self.faults = {Tile(*t): f for t, f in (faults or {}).items()}
        self.hits: Counter[Tile] = Counter()  # requests per tile
        self.requests: deque[Request] = deque(maxlen=10_000)  # the latest requests
        self._regex = _pattern_regex(self.url_pattern)
        self._lock = threading.Lock()
        self._host, self._port = host, port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---
    def start(self) -> TileServer:
        if self._httpd is not None:
            return self
        self._httpd = _Server((self._host, self._port), _Handler)
        self._httpd.tile_server = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"tileserver-{self.port}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> TileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- addresses ---
    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("tile server is not running (call start() or use `with`)")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def url_template(self) -> str:
        return f"{self.base_url}/{self.url_pattern}"

    # --- serving ---
    def tile_for_path(self, path: str) -> Tile | None:
        m = self._regex.match(urlsplit(path).path)
        return _tile_from_match(m) if m else None

    def file_for(self, tile: Tile) -> Path:
        name = self.pattern.replace("{z}", str(tile.z)).replace("{x}", str(tile.x))
        name = name.replace("{y}", str(tile.y)).replace("{-y}", str(2**tile.z - 1 - tile.y))
        return self.directory / name.replace("{q}", mercantile.quadkey(tile))

    def fault_for(self, tile: Tile) -> Fault | None:
        """The fault to apply to this request of ``tile`` (counts the request)."""
        with self._lock:
            self.hits[tile] += 1
            n = self.hits[tile]
        fault = self.faults.get(tile)
        if fault is None or (fault.times is not None and n > fault.times):
            return None
        return fault


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    tile_server: TileServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that timed out and hung up: normal with slow faults
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real tile servers
    timeout = 60  # an idle keep-alive connection frees its thread after this
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        ts = self.server.tile_server
        ts.requests.append(Request(self.path, dict(self.headers.items())))
        tile = ts.tile_for_path(self.path)
        if tile is None:
            self._send(404, b"not a tile path\n", "text/plain")
            return
        fault = ts.fault_for(tile)
        if fault is not None and fault.delay_s:
            time.sleep(fault.delay_s)
        if fault is not None and fault.status is not None:
            extra = {}
            if fault.retry_after is not None:
                extra["Retry-After"] = f"{fault.retry_after:g}"
            self._send(fault.status, f"HTTP {fault.status}\n".encode(), "text/plain", extra)
            return
        if fault is not None and fault.body is not None:
            self._send(200, fault.body, "image/png")
            return
        try:
            data = ts.file_for(tile).read_bytes()
        except OSError:
            self._send(404, b"no such tile\n", "text/plain")
            return
        ctype = _CONTENT_TYPES.get(sniff_format(data) or "", "application/octet-stream")
        self._send(200, data, ctype)

    def _send(self, status: int, body: bytes, ctype: str,
              headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # quiet: tests and the demo print their own lines


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a tile folder on 127.0.0.1.")
    parser.add_argument("directory")
    parser.add_argument("pattern", nargs="?", default="{z}/{x}/{y}.png")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with TileServer(args.directory, args.pattern, port=args.port) as server:
        print(server.url_template, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":  # pragma: no cover
    main()
