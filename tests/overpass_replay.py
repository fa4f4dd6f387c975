"""A local stand-in for an Overpass API server, on 127.0.0.1 (ephemeral port).

It answers ``/api/interpreter`` (GET or POST ``data=``) with a recorded reply
from ``../shared/data/overpass`` and ``/api/status`` with recorded status
texts, and injects the faults real public servers produce, so the client's
retries, slot waiting and error reporting are tested over real HTTP:

* ``"429"`` / ``"504"``: that status (``Retry-After: 0`` on 429);
* ``"reset"``: the TCP connection is reset without a reply;
* ``"hang"``: no reply for ``hang_s`` seconds (longer than the client waits);
* ``"malformed"``: a cut-off JSON body with status 200;
* ``"runtime-error"``: the recorded "runtime error: Query timed out" remark.

Faults queued with :meth:`ReplayServer.fault` are used one per interpreter
request before the normal reply; :meth:`fail_queries_with` fails every query
containing a text (e.g. one sub-box) until cleared.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

FAULT_REPLIES = {"runtime-error": "overpy/json/remark-runtime-error-01.json"}


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    query: str
    at: float  # time.monotonic() on arrival


class ReplayServer:
    def __init__(self, data_dir: Path, reply: str = "overpy/json/way-02.json") -> None:
        self.data_dir = data_dir
        self.reply_name = reply
        self.status_names: deque[str] = deque(["no_slots_waiting"])
        self.faults: deque[str] = deque()
        self.failing: dict[str, str] = {}
        self.requests: list[Request] = []
        self.hang_s = 5.0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        daemon=True)

    # --- control ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/api/interpreter"

    def reply(self, name: str) -> ReplayServer:
        """The reply to serve: a recording (path under the data dir), or a file a
        test wrote (absolute path)."""
        self.reply_name = name
        return self

    def fault(self, *names: str) -> ReplayServer:
        self.faults.extend(names)
        return self

    def fail_queries_with(self, text: str, fault: str = "504") -> ReplayServer:
        self.failing[text] = fault
        return self

    def status(self, *names: str) -> ReplayServer:
        """Status replies in order (file stems of wrapper/overpass_status); the last repeats."""
        self.status_names = deque(names)
        return self

    def interpreter_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path.endswith("/interpreter")]

    def status_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path.endswith("/status")]

    def __enter__(self) -> ReplayServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    # --- serving ---------------------------------------------------------------------
    def _next_status(self) -> bytes:
        with self._lock:
            name = self.status_names[0]
            if len(self.status_names) > 1:
                self.status_names.popleft()
        return (self.data_dir / "wrapper" / "overpass_status" / f"{name}.txt").read_bytes()

    def _next_fault(self, query: str) -> str | None:
        with self._lock:
            for text, fault in self.failing.items():
                if text in query:
                    return fault
            return self.faults.popleft() if self.faults else None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json",
                      headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _record(self, query: str) -> None:
                path = urlsplit(self.path).path
                with server._lock:
                    server.requests.append(Request(path, dict(self.headers), query,
                                                   time.monotonic()))

            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                parts = urlsplit(self.path)
                if parts.path == "/api/status":
                    self._record("")
                    self._send(200, server._next_status(), "text/plain")
                elif parts.path == "/api/interpreter":
                    self._interpret(parse_qs(parts.query).get("data", [""])[0])
                else:
                    self._send(404, b"not found", "text/plain")

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                form = parse_qs(self.rfile.read(length).decode())
                if urlsplit(self.path).path != "/api/interpreter":
                    self._send(404, b"not found", "text/plain")
                    return
                self._interpret(form.get("data", [""])[0])

            def _interpret(self, query: str) -> None:
                self._record(query)
                fault = server._next_fault(query)
                if fault == "hang":
                    time.sleep(server.hang_s)
                    self.close_connection = True
                    return
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault in ("429", "504"):
                    headers = {"Retry-After": "0"} if fault == "429" else {}
                    self._send(int(fault), b"<html><body>busy</body></html>", "text/html",
                               headers)
                    return
                name = FAULT_REPLIES.get(fault or "", server.reply_name)
                body = (server.data_dir / name).read_bytes()
                if fault == "malformed":
                    body = body[: len(body) // 2]
                ctype = "application/osm3s+xml" if name.endswith(".xml") else "application/json"
                self._send(200, body, ctype)

        return Handler
