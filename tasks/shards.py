"""The WebDataset shard format shared by packing, training and mining.

A sample is one tile: ``<key>.image.png`` (or ``.image.webp``), ``<key>.mask.png``
(0 background, i+1 for class i of ``meta["classes"]``, 255 ignore),
``<key>.meta.json`` and, when the run's harvest wrote distance targets,
``<key>.sdt.png`` (the tile's signed-distance PNG as harvested: uint8, 1..255,
128 on an instance outline); the key is ``z{z}_{x}_{y}`` (no dots: WebDataset
splits file names at the first dot).

Shards are written by :class:`AtomicShardWriter`: each ``<prefix>-NNNNNN.tar``
appears whole or not at all, locally and on S3, so an interrupted pack never
leaves a truncated shard that a training run would trip over.

:func:`register_gopen_schemes` is the one place that teaches WebDataset to read
``s3://`` (and any other fsspec protocol) through fsspec, so shards are read
with the same credentials/endpoint as the rest of mapgap.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from mapgap import storage

IGNORE = 255
IMAGE_KEYS = ("image.png", "image.webp")
MASK_KEY = "mask.png"
META_KEY = "meta.json"
SDT_KEY = "sdt.png"
# wds handles plain paths itself; everything else fsspec knows goes through fsspec.
_NATIVE = {"file", "local"}


class CorruptSampleError(ValueError):
    """A sample that cannot be decoded (names the sample and what is wrong)."""


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    # Shards are read front to back: a large read-ahead block keeps S3 requests few.
    return fs.open(path, mode, block_size=8 << 20, cache_type="readahead")


def register_gopen_schemes() -> None:
    """Route every fsspec protocol (s3, gs, az, memory, ...) in ``webdataset.gopen``
    through fsspec. Idempotent; called by everything that reads or writes shards."""
    import fsspec
    from webdataset.gopen import gopen_schemes

    for proto in fsspec.available_protocols():
        if proto not in _NATIVE:
            gopen_schemes[proto] = _fsspec_gopen


def shard_keys(uris: Sequence[str]) -> set[str]:
    """Sample keys (tile keys) in WebDataset shards (training picks its val sample
    from them, mining keeps them out of its pool)."""
    import tarfile

    keys: set[str] = set()
    for uri in uris:
        with storage.local_file(uri) as path, tarfile.open(path) as tar:
            keys.update(name.split(".", 1)[0] for name in tar.getnames())
    return keys


def trained_classes(cfg: Any) -> list[str]:
    """``train.classes`` (checked against the configured classes) or all classes."""
    names = [c.name for c in cfg.classes]
    chosen = list(cfg.train.classes or names)
    unknown = [c for c in chosen if c not in names]
    if unknown:
        raise ValueError(f"train.classes: unknown class {unknown[0]!r} "
                         f"(configured: {', '.join(names)})")
    return chosen


# --- encoding --------------------------------------------------------------------------

def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_image(rgb: np.ndarray, fmt: str, webp_quality: int = 90) -> bytes:
    if fmt == "png":
        return png_bytes(rgb)
    buf = io.BytesIO()
    lossless = webp_quality >= 100
    # For lossless WebP "quality" is encoder effort: 100 is ~10x slower for the same size.
    Image.fromarray(rgb).save(buf, format="WEBP", lossless=lossless, method=4,
                              quality=50 if lossless else webp_quality)
    return buf.getvalue()


def sample_dict(key: str, image: bytes, image_format: str, mask: bytes,
                meta: dict[str, Any], sdt: bytes | None = None) -> dict[str, Any]:
    """A WebDataset sample whose values are already-encoded bytes; ``sdt``: the
    distance-target PNG, when the sample has one."""
    sample = {
        "__key__": key,
        f"image.{image_format}": image,
        MASK_KEY: mask,
        META_KEY: json.dumps(meta, sort_keys=True).encode(),
    }
    if sdt is not None:
        sample[SDT_KEY] = sdt
    return sample


# --- decoding --------------------------------------------------------------------------

def _where(sample: dict[str, Any]) -> str:
    url = sample.get("__url__")
    return f"{url}: sample {sample.get('__key__')}" if url else f"sample {sample.get('__key__')}"


def decode_rgb(data: bytes) -> np.ndarray:
    """PNG/WebP/JPEG bytes -> RGB uint8 [H,W,3]. OpenCV decodes about a third faster
    than PIL, and decoding is most of a training loader's work."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("not a decodable PNG, WebP or JPEG image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_sample(sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Raw sample -> (RGB uint8 [H,W,3], mask uint8 [H,W], meta). Raises
    CorruptSampleError for missing parts, undecodable bytes or mismatched sizes."""
    where = _where(sample)
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    missing = [k for k, ok in (("image", image_key), (MASK_KEY, MASK_KEY in sample),
                               (META_KEY, META_KEY in sample)) if not ok]
    if missing:
        raise CorruptSampleError(f"{where}: missing {', '.join(missing)}")
    try:
        image = decode_rgb(sample[image_key])
        mask = Image.open(io.BytesIO(sample[MASK_KEY]))
        if mask.mode not in ("L", "P"):
            raise CorruptSampleError(f"{where}: mask mode is {mask.mode}, expected 8-bit")
        mask = np.asarray(mask)
        meta = json.loads(sample[META_KEY])
    except (OSError, UnidentifiedImageError, ValueError) as err:
        if isinstance(err, CorruptSampleError):
            raise
        raise CorruptSampleError(f"{where}: cannot decode ({err})") from None
    if image.shape[:2] != mask.shape:
        raise CorruptSampleError(f"{where}: image is {image.shape[1]}x{image.shape[0]} px "
                                 f"but mask is {mask.shape[1]}x{mask.shape[0]} px")
    return image, mask, meta


def decode_distance(sample: dict[str, Any]) -> np.ndarray | None:
    """The sample's distance target as uint8 [H,W], or None when it has none (shards
    of runs without distance targets, mined samples without one). Raises
    CorruptSampleError for undecodable bytes or a size other than the mask's."""
    if SDT_KEY not in sample:
        return None
    where = _where(sample)
    if MASK_KEY not in sample:
        raise CorruptSampleError(f"{where}: missing {MASK_KEY}")
    try:
        sdt = Image.open(io.BytesIO(sample[SDT_KEY]))
        if sdt.mode != "L":
            raise CorruptSampleError(f"{where}: {SDT_KEY} mode is {sdt.mode}, expected 8-bit")
        width, height = Image.open(io.BytesIO(sample[MASK_KEY])).size  # header only
        sdt = np.asarray(sdt)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        if isinstance(err, CorruptSampleError):
            raise
        raise CorruptSampleError(f"{where}: cannot decode {SDT_KEY} ({err})") from None
    if sdt.shape != (height, width):
        raise CorruptSampleError(f"{where}: {SDT_KEY} is {sdt.shape[1]}x{sdt.shape[0]} px "
                                 f"but mask is {width}x{height} px")
    return sdt


# --- writing ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _HashingWriter:
    """File wrapper counting and hashing what tarfile streams through it.
    ``detach()`` drops the file: an aborted tar stream's final flush goes nowhere."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f: IO[bytes] | None = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        if self.f is None:
            return len(data)
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def detach(self) -> None:
        self.f = None


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


class AtomicShardWriter:
    """``webdataset.ShardWriter`` semantics (maxcount / maxsize rollover) with
    atomic shards: a shard is committed only when complete; an exception inside
    the ``with`` block discards the shard being written (earlier shards stay).

    Tar headers carry a fixed mtime so the same samples give byte-identical
    shards (and the same sha256 in the manifest).
    """

    def __init__(self, directory: str, prefix: str, maxcount: int, maxsize: int,
                 start_shard: int = 0, max_shards: int | None = None) -> None:
        self.directory = directory
        self.prefix = prefix
        self.maxcount = maxcount
        self.maxsize = maxsize
        self.next_number = start_shard
        self.last_number = None if max_shards is None else start_shard + max_shards - 1
        self.shards: list[ShardInfo] = []
        self._stack: contextlib.ExitStack | None = None
        self._tar: Any = None
        self._out: _HashingWriter | None = None
        self._name = ""
        self._count = 0

    def __enter__(self) -> AtomicShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self._commit()
        elif self._stack is not None:
            self._out.detach()
            self._stack.__exit__(exc_type, exc, tb)  # atomic_open discards the partial shard
            self._stack = None

    def write(self, sample: dict[str, Any]) -> None:
        if self._stack is not None and (self._count >= self.maxcount
                                        or self._out.size >= self.maxsize):
            self._commit()
        if self._stack is None:
            self._open()
        self._tar.write(sample)
        self._count += 1

    def _open(self) -> None:
        from webdataset import TarWriter

        if self.last_number is not None and self.next_number > self.last_number:
            raise ValueError(f"{self.directory}: more than {self.last_number + 1} shards for "
                             f"prefix {self.prefix!r}; raise pack.maxsize/maxcount")
        self._name = shard_name(self.prefix, self.next_number)
        self.next_number += 1
        self._stack = contextlib.ExitStack()
        f = self._stack.enter_context(storage.atomic_open(storage.join(self.directory,
                                                                       self._name)))
        self._out = _HashingWriter(f)
        self._tar = TarWriter(self._out, encoder=False, mtime=0, compress=False)
        self._count = 0

    def _commit(self) -> None:
        if self._stack is None:
            return
        self._tar.close()
        self._stack.close()  # rename / complete the upload: the shard becomes visible
        self.shards.append(ShardInfo(self._name, self._count, self._out.size,
                                     self._out.sha.hexdigest()))
        self._stack = None
