"""Batch inference over every imagery tile of the AOI, without seams.

Each tile is predicted on a window that adds ``margin_px`` of context from its
8 neighbours (mirrored where a neighbour has no imagery) and only the centre is
kept, so a building cut by a tile border gets the same probabilities on both
sides. Inside a task a DataLoader decodes windows in worker processes while the
model runs, and a writer thread encodes the PNGs: reading, forward and writing
overlap. Memory is bounded by the batch size, the prefetch depth and a small
LRU of decoded tiles, whatever the size of the AOI.

Loader workers start from a fork server (:mod:`mapgap.workers`): a script that
calls this directly needs an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mapgap import storage
from mapgap.grid import Tile, neighbours, parse_tile_key, tile_key
from mapgap.layout import RunLayout
from mapgap.models.precision import cuda_half_dtype
from mapgap.orchestration import stage_task
from mapgap.progress import get_logger
from mapgap.tasks.neighbourhood import TileCache, cache_capacity, row_major, with_margin
from mapgap.workers import worker_context

MODEL_MULTIPLE = 32  # the model contract: H and W multiples of 32
_REGISTRY_SPEC = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


# Failure injection for rerun tests and drills: the batch holding this tile key fails.
FAULTY_TILE_ENV = "MAPGAP_FAULTY_TILE"


class ModelLoadError(ValueError):
    """The configured model cannot be found or opened (one line, names it)."""


class NoImageryError(ValueError):
    """Nothing to predict: the AOI has no imagery tile in the run dir."""


class TileReadError(ValueError):
    """A stored tile is not a decodable image of the expected size."""


@dataclass(frozen=True)
class ModelRef:
    """Which model to load, plus ``key``: what makes its weights unique (registry
    version or file digest), so cached predictions are redone for a new champion."""

    spec: str
    tracking_uri: str | None
    key: str
    run_id: str | None = None


@dataclass(frozen=True)
class PredictSettings:
    """The inference options that change probabilities or how they are computed."""

    tile_size: int
    margin_px: int = 32
    batch_size: int = 8
    threads: int | None = None
    device: str = "auto"
    tta: bool = False
    loader_workers: int = 1
    prefetch_batches: int = 2
    tile_cache: int = 128

    @classmethod
    def from_config(cls, cfg: Any) -> PredictSettings:
        inf = cfg.inference
        return cls(tile_size=cfg.tile_size, margin_px=inf.margin_px, batch_size=inf.batch_size,
                   threads=inf.threads, device=inf.device, tta=inf.tta,
                   loader_workers=inf.loader_workers, prefetch_batches=inf.prefetch_batches,
                   tile_cache=inf.tile_cache)

    @property
    def window_margin(self) -> int:
        """``margin_px`` rounded up so the window is a multiple of 32 px."""
        extra = (-(self.tile_size + 2 * self.margin_px)) % MODEL_MULTIPLE
        if extra % 2:
            raise ValueError(f"tile_size {self.tile_size}: no symmetric margin makes it a "
                             f"multiple of {MODEL_MULTIPLE}")
        return self.margin_px + extra // 2


# --- model ---------------------------------------------------------------------------------

def default_model_spec(cfg: Any) -> str:
    """The registry model trained on this config's classes (named by the training stage)."""
    from mapgap.tracking import model_name

    return f"models:/{model_name(cfg.train.classes or [c.name for c in cfg.classes])}@champion"


def resolve_model(cfg: Any, spec: str | None = None, field: str = "inference.model"
                  ) -> ModelRef:
    """Pin a model: registry alias -> version, checkpoint -> digest. ``spec``
    (named ``field`` in errors) defaults to the configured inference model."""
    spec = spec or cfg.inference.model or default_model_spec(cfg)
    if not spec.startswith("models:/"):
        if not storage.exists(spec):
            raise ModelLoadError(f"{field}: checkpoint not found: {spec}")
        return ModelRef(spec, None, key=storage.fingerprint([spec]))
    from mapgap.tracking import tracking_uri

    return registry_model(spec, tracking_uri(cfg), field)


def registry_model(spec: str, tracking: str, field: str = "inference.model") -> ModelRef:
    from mlflow.exceptions import MlflowException

    from mapgap.tracking import client as tracking_client

    m = _REGISTRY_SPEC.match(spec)
    if not m:
        raise ModelLoadError(f"{field}: expected models:/<name>@<alias> or "
                             f"models:/<name>/<version>, got {spec!r}")
    client = tracking_client(tracking)
    try:
        if m["alias"]:
            mv = client.get_model_version_by_alias(m["name"], m["alias"])
        else:
            mv = client.get_model_version(m["name"], m["version"])
    except MlflowException:
        raise ModelLoadError(f"{field}: {spec} is not in the MLflow registry at "
                             f"{tracking} (train a model first: mapgap train)") from None
    return ModelRef(spec, tracking, key=f"{m['name']}/{mv.version}", run_id=mv.run_id)


@lru_cache(maxsize=2)
def load_model(ref: ModelRef) -> nn.Module:
    """The model in eval mode, loaded once per process (tasks of one run share it)."""
    from mapgap.models.inference import load_model as load

    model = load(ref.spec, tracking_uri=ref.tracking_uri)
    if not getattr(model, "classes", None):
        raise ModelLoadError(f"{ref.spec}: the model has no .classes")
    return model.eval()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("inference.device: cuda requested but torch sees no GPU")
    return torch.device(name)


# --- tiles ---------------------------------------------------------------------------------

def stored_tiles(directory: str, zoom: int) -> dict[Tile, str]:
    """Tiles with a ``<directory>/<z>/<x>/<y>.png`` file -> its version token (see
    ``storage.glob_versions``), from one listing, not one request each."""
    found = {}
    for uri, version in storage.glob_versions(
            storage.join(directory, str(zoom), "*", "*.png")).items():
        parts = uri.replace("\\", "/").rsplit("/", 2)
        found[Tile(int(parts[1]), int(parts[2].removesuffix(".png")), zoom)] = version
    return found


def imagery_digest(tiles: list[Tile], versions: dict[Tile, str]) -> str:
    """What a batch's probabilities depend on besides the model: the versions of
    its tiles and of their neighbours (the context margin), so a re-fetched tile
    re-predicts its batch and the batches next to it."""
    around = {n for t in tiles for n in (t, *neighbours(t))}
    h = hashlib.md5()
    for t in sorted(around & versions.keys()):
        h.update(f"{tile_key(t)}={versions[t]};".encode())
    return h.hexdigest()


def stored_imagery_digest(layout: RunLayout, zoom: int) -> str:
    """The run's stored imagery as a whole (for stages that read all of it)."""
    versions = stored_tiles(layout.images, zoom)
    return imagery_digest(list(versions), versions)


def tiles_to_predict(cfg: Any, layout: RunLayout) -> tuple[dict[Tile, str], int]:
    """(AOI tiles that have imagery -> their version tokens, number of AOI tiles
    without imagery)."""
    from mapgap.grid import tiles_for_geometry

    aoi = tiles_for_geometry(cfg.aoi_geometry, cfg.zoom)
    have = stored_tiles(layout.images, cfg.zoom)
    tiles = {t: have[t] for t in aoi if t in have}
    if not tiles:
        raise NoImageryError(f"{layout.images}: no imagery tile for the AOI ({len(aoi)} tiles "
                             f"at zoom {cfg.zoom}); run mapgap fetch first")
    return tiles, len(aoi) - len(tiles)


def blocked_order(tiles: list[Tile], tiles_per_task: int) -> list[Tile]:
    """Square blocks of about ``tiles_per_task`` tiles, row-major inside: consecutive
    batches are compact areas, so few neighbours are read twice."""
    side = max(1, math.isqrt(tiles_per_task))
    return sorted(tiles, key=lambda t: (t.z, t.y // side, t.x // side, t.y, t.x))


def decode_image(data: bytes, uri: str, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3] from PNG/JPEG/WebP bytes."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise TileReadError(f"{uri}: not a decodable image")
    if img.shape[:2] != (size, size):
        raise TileReadError(f"{uri}: {img.shape[1]}x{img.shape[0]} px, expected {size}x{size}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_image(layout: RunLayout, size: int, tile: Tile) -> np.ndarray | None:
    """A tile's RGB pixels, or None when the tile has no imagery."""
    uri = layout.image(tile)
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError:
        return None
    return decode_image(data, uri, size)


class ContextWindows(IterableDataset):
    """(index, uint8 [3, S+2m, S+2m]) for tiles in row-major order; each loader worker
    takes a contiguous run of rows so its neighbour cache keeps working."""

    def __init__(self, layout: RunLayout, tiles: list[Tile], s: PredictSettings) -> None:
        self.layout, self.tiles, self.s = layout, tiles, s

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        info = get_worker_info()
        n = len(self.tiles)
        lo, hi = (0, n) if info is None else (
            n * info.id // info.num_workers, n * (info.id + 1) // info.num_workers)
        mine = self.tiles[lo:hi]
        cache = TileCache(lambda t: read_image(self.layout, self.s.tile_size, t),
                          cache_capacity(mine, self.s.tile_cache))
        for i, tile in enumerate(mine, lo):
            window = with_margin(tile, cache, self.s.window_margin)
            yield i, torch.from_numpy(np.ascontiguousarray(window.transpose(2, 0, 1)))


def _init_worker(_: int) -> None:
    # Decoding workers must not compete with the model for cores (DataLoader
    # already limits torch to one thread per worker).
    cv2.setNumThreads(1)


def window_loader(layout: RunLayout, ordered: list[Tile], s: PredictSettings,
                  device: torch.device) -> DataLoader:
    """Batches of (index into ``ordered``, context window), decoded by
    ``s.loader_workers`` processes while the model runs."""
    workers = min(s.loader_workers, len(ordered))
    return DataLoader(
        ContextWindows(layout, ordered, s), batch_size=s.batch_size, num_workers=workers,
        prefetch_factor=s.prefetch_batches if workers else None, worker_init_fn=_init_worker,
        multiprocessing_context=worker_context(__name__) if workers else None,
        pin_memory=device.type == "cuda")


# --- probabilities -------------------------------------------------------------------------

def encode_probability(probs: np.ndarray) -> bytes:
    """uint8 [C, H, W] -> PNG: grey for 1 class, RGB(A) bands in class order for 2-4."""
    c = probs.shape[0]
    if c > 4:
        raise ValueError(f"{c} classes: a probability PNG holds at most 4 bands")
    if c == 1:
        img = probs[0]
    else:
        bands = list(probs) + [np.zeros_like(probs[0])] * (c == 2)
        img = np.stack(bands[2::-1] + bands[3:], axis=-1)  # OpenCV wants BGR(A)
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_probability(data: bytes, n_classes: int, uri: str) -> np.ndarray:
    """PNG -> uint8 [C, H, W] (inverse of :func:`encode_probability`)."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise TileReadError(f"{uri}: not a decodable probability PNG")
    if img.ndim == 2:
        return img[None]
    return np.stack([img[..., i] for i in (2, 1, 0, 3)[:img.shape[2]]][:n_classes])


def read_probability(layout: RunLayout, n_classes: int, tile: Tile) -> np.ndarray | None:
    uri = layout.probability(tile)
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError:
        return None
    return decode_probability(data, n_classes, uri)


def _flip_mean(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               tta: bool) -> torch.Tensor:
    """``fn(x)``; with TTA the mean over the identity and three flips."""
    p = fn(x)
    if tta:
        for dims in ((3,), (2,), (2, 3)):
            p = p + fn(x.flip(dims)).flip(dims)
        p = p / 4
    return p


def forward(model: nn.Module, x: torch.Tensor, tta: bool) -> torch.Tensor:
    """Class probabilities [B, C, H, W] (what mining compares with labels)."""
    return _flip_mean(model, x, tta)


def forward_bands(model: nn.Module, x: torch.Tensor, tta: bool) -> torch.Tensor:
    """Every band the probability PNGs hold: ``model.bands(x)`` (class probabilities,
    then the instance distance) when the model has it, else the class probabilities.
    The distance is flip-equivariant like the classes, so TTA averages it too."""
    return _flip_mean(getattr(model, "bands", model), x, tta)


def band_names(model: nn.Module) -> list[str]:
    """Names of the PNG bands :func:`forward_bands` writes, in order."""
    return list(getattr(model, "band_names", None) or model.classes)


def autocast(device: torch.device) -> Any:
    """Autocast on CUDA in training's half precision; float32 on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=cuda_half_dtype())


def predict_tiles(layout: RunLayout, tiles: list[Tile], model: nn.Module,
                  s: PredictSettings, out: RunLayout | None = None) -> dict[str, int]:
    """Predict ``tiles`` (all with imagery in ``layout``) and write their probability
    PNGs to ``out`` (default ``layout``): validation predicts a run's val tiles into a
    scratch dir, with the run's imagery as context, without touching ``predict/``."""
    if s.threads:
        torch.set_num_threads(s.threads)
    device = resolve_device(s.device)
    model = model.to(device).eval()
    ordered = row_major(tiles)
    loader = window_loader(layout, ordered, s, device)
    m, size = s.window_margin, s.tile_size
    pending: deque[Future] = deque()
    written = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mapgap-write") as writer, \
            torch.inference_mode():
        for idx, x in loader:
            x = x.to(device, non_blocking=True).float().div_(255)
            with autocast(device):
                p = forward_bands(model, x, s.tta)[:, :, m:m + size, m:m + size].float()
            probs = p.mul(255).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()
            pending.append(writer.submit(_write_batch, out or layout, [ordered[i] for i in idx],
                                         probs))
            while len(pending) > 2:  # bounded: never more than a few batches in flight
                written += pending.popleft().result()
        written += sum(f.result() for f in pending)
    return {"tiles": written}


def _write_batch(layout: RunLayout, tiles: list[Tile], probs: np.ndarray) -> int:
    for tile, p in zip(tiles, probs, strict=True):
        storage.write_bytes(layout.probability(tile), encode_probability(p))
    return len(tiles)


def write_meta(layout: RunLayout, ref: ModelRef, classes: list[str], s: PredictSettings,
               bands: list[str] | None = None, polygons: dict[str, Any] | None = None) -> str:
    """What the probability PNGs mean (``bands``: see :func:`band_names`; default the
    classes), which model made them and how they become polygons (``polygons``: the
    threshold and minimum area used, and whether they are the model's calibration)."""
    return storage.write_json(layout.predict_meta, {
        "classes": classes, "bands": bands or classes, "model": ref.spec, "model_key": ref.key,
        "run_id": ref.run_id,
        "tile_size": s.tile_size, "margin_px": s.window_margin, "tta": s.tta,
        **({"polygons": polygons} if polygons else {})})


@stage_task(name="predict-tiles")
def predict_batch(run_uri: str, tile_keys: list[str], model: ModelRef,
                  settings: PredictSettings, imagery: str, out_uri: str | None = None
                  ) -> dict[str, int]:
    """One cached task per batch of tiles (the model is loaded once per process);
    ``imagery``: the batch's :func:`imagery_digest`, part of the cache key;
    ``out_uri``: the root of another layout to write the probabilities to."""
    faulty = os.environ.get(FAULTY_TILE_ENV)
    if faulty in tile_keys:
        raise TileReadError(f"{FAULTY_TILE_ENV}={faulty}: injected failure in this tile batch")
    tiles = [parse_tile_key(k) for k in tile_keys]
    result = predict_tiles(RunLayout(run_uri), tiles, load_model(model), settings,
                           RunLayout(out_uri) if out_uri else None)
    get_logger().info("predicted %d tiles (%s..%s)", result["tiles"], tile_keys[0],
                      tile_keys[-1])
    return result
