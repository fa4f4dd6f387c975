"""One small layer over fsspec so every stage reads and writes the same way on a
local directory and on ``s3://`` (s3fs).

Every write is atomic: local files are written to a temporary name in the same
directory and renamed into place; S3 objects only become visible when the upload
completes. A reader therefore never sees a half-written file, and an interrupted
write leaves the previous version intact.

S3 endpoint and credentials come from the environment only (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``...), so remote workers resolve them the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs


class StorageError(RuntimeError):
    """An I/O problem, always naming the URI involved."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(uri)


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/' for remote URIs and os.path for local ones."""
    if is_remote(base):
        return posixpath.join(base, *parts)
    return str(Path(base, *parts))


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = _fs(uri)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_text(uri))
    except json.JSONDecodeError as err:
        raise StorageError(f"{uri}: not valid JSON ({err.msg} at line {err.lineno})") from None


TMP_MARK = ".tmp-"
# What atomic_open names its temporaries: ".<name>.tmp-<8 hex digits>".
TMP_PATTERN = re.compile(r"^\..+" + re.escape(TMP_MARK) + r"[0-9a-f]{8}$")


def sweep_temporaries(folder: str) -> list[str]:
    """Remove the temporaries that killed writers left below a local ``folder``.

    Only files named like :func:`atomic_open`'s temporaries, and only safe while
    no writer is active there: callers hold the run dir's lock. Returns them.
    (S3 writes leave no temporaries: an interrupted upload never appears.)
    """
    if is_remote(folder) or not Path(folder).is_dir():
        return []
    swept = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if TMP_PATTERN.match(name):
                path = os.path.join(dirpath, name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    swept.append(path)
    return sorted(swept)


@contextlib.contextmanager
def atomic_open(uri: str, mode: str = "wb") -> Iterator[IO]:
    """Open ``uri`` for writing so that it appears whole or not at all."""
    if "w" not in mode:
        raise ValueError(f"atomic_open is for writing, got mode {mode!r}")
    fs, path = _fs(uri)
    if is_remote(uri):
        # An S3 object is only created when the (multipart) upload completes;
        # an exception discards the upload.
        f = fs.open(path, mode)
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()
                f.closed = True  # nothing to flush: the object is never created
            raise
        f.close()
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode) as f:
            yield f
        # No fsync: rename is atomic against a killed process, which is what
        # reruns must survive; fsync per tile would triple the cost of a fetch.
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(uri: str, data: bytes) -> str:
    with atomic_open(uri, "wb") as f:
        f.write(data)
    return uri


def write_text(uri: str, text: str) -> str:
    return write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> str:
    return write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def fingerprint(uris: list[str]) -> str:
    """A short digest of the *content* of files (missing ones count as absent).

    Passed as a task input next to URIs, it makes cached tasks downstream of a
    changed file recompute, while rewriting identical bytes changes nothing.
    Local files are hashed; S3 objects contribute their ETag (an MD5 of content).
    """
    h = hashlib.md5()
    for uri in sorted(uris):
        h.update(uri.encode())
        fs, path = _fs(uri)
        if not fs.exists(path):
            h.update(b"<absent>")
        elif is_remote(uri):
            info = fs.info(path)
            h.update(str(info.get("ETag", info.get("size"))).encode())
        else:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def glob(pattern: str) -> list[str]:
    """Sorted URIs matching a glob pattern (same scheme as the pattern)."""
    fs, path = _fs(pattern)
    found = sorted(fs.glob(path))
    if is_remote(pattern):
        proto = pattern.split("://", 1)[0]
        return [f"{proto}://{p}" for p in found]
    return found


def glob_versions(pattern: str) -> dict[str, str]:
    """URIs matching a glob pattern -> a token that changes when the file is
    rewritten (S3: ETag; local: size and mtime), from one listing: cheap enough
    to fingerprint thousands of tiles without reading them."""
    fs, path = _fs(pattern)
    found = fs.glob(path, detail=True)
    prefix = pattern.split("://", 1)[0] + "://" if is_remote(pattern) else ""
    return {prefix + p: str(info.get("ETag") or f"{info.get('size')}-{info.get('mtime')}")
            for p, info in sorted(found.items())}


def files_under(folder: str) -> set[str]:
    """URIs of every file below ``folder`` (same scheme), from one recursive listing."""
    fs, path = _fs(folder)
    return {folder + p[len(path):] for p in fs.find(path)}


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = _fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def makedirs(uri: str) -> None:
    if not is_remote(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def local_file(uri: str, suffix: str = "") -> Iterator[Path]:
    """A local path for libraries that need a real file (osmium, GDAL drivers).

    Local URIs are used in place; remote ones are downloaded to a temp file.
    """
    if not is_remote(uri):
        path = Path(uri.removeprefix("file://"))
        if not path.exists():
            raise StorageError(f"{uri}: no such file")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mapgap-") as tmp:
        local = Path(tmp, "data" + (suffix or Path(uri).suffix))
        fs, path = _fs(uri)
        try:
            with fs.open(path, "rb") as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except FileNotFoundError:
            raise StorageError(f"{uri}: no such file") from None
        yield local
