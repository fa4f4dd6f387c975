"""Where each stage puts its outputs inside a run dir (``<root>/runs/<name>/``).

Stages only talk to each other through these URIs, so a stage can be rerun,
inspected or replaced on its own, locally or on S3.
"""

from __future__ import annotations

from dataclasses import dataclass

from mapgap import storage
from mapgap.grid import Tile


@dataclass(frozen=True)
class RunLayout:
    root: str

    def _p(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # --- labels (harvest) ---
    def labels(self, class_name: str) -> str:
        """GeoParquet of one class's OSM features (EPSG:4326)."""
        return self._p("labels", f"{class_name}.parquet")

    @property
    def labels_summary(self) -> str:
        return self._p("labels", "summary.json")

    @property
    def overpass_replies(self) -> str:
        """Raw Overpass replies, one file per query hash (``<hash>.json|xml``)."""
        return self._p("labels", "overpass")

    # --- imagery (fetch) ---
    @property
    def images(self) -> str:
        """Folder of the imagery tiles: ``<images>/<z>/<x>/<y>.png``."""
        return self._p("tiles")

    def image(self, tile: Tile) -> str:
        """The fetched tile, tile_size px: PNG, or the source's own JPEG/WebP bytes
        when they needed no change (decode by content, take RGB)."""
        return self._p("tiles", str(tile.z), str(tile.x), f"{tile.y}.png")

    @property
    def fetch_report(self) -> str:
        return self._p("tiles", "fetch_report.json")

    # --- masks (rasterize) ---
    def mask(self, tile: Tile) -> str:
        """uint8 PNG: 0 background, class index by priority, 255 ignore."""
        return self._p("masks", str(tile.z), str(tile.x), f"{tile.y}.png")

    @property
    def mask_stats(self) -> str:
        """Per tile: feature count and foreground fraction per class."""
        return self._p("masks", "stats.json")

    @property
    def masks_drawn_from(self) -> str:
        """Which labels (uri + sha256 per class) the stored masks were drawn from."""
        return self._p("masks", "labels.json")

    def mask_stats_part(self, batch_id: str) -> str:
        """Stats of one rasterize batch, merged into mask_stats by the flow."""
        return self._p("masks", "stats-parts", f"{batch_id}.json")

    def signed_distance(self, tile: Tile) -> str:
        """uint8 PNG signed distance to the nearest label edge (128 = on the edge)."""
        return self._p("masks-sdt", str(tile.z), str(tile.x), f"{tile.y}.png")

    # --- shards (pack) ---
    @property
    def shards(self) -> str:
        return self._p("shards")

    @property
    def manifest(self) -> str:
        return self._p("shards", "manifest.json")

    # --- training / mining ---
    @property
    def train(self) -> str:
        return self._p("train")

    def mining_round(self, k: int) -> str:
        return self._p("mining", f"round-{k:02d}")

    @property
    def mining_pool(self) -> str:
        """Mined and held-back tiles of the hard-negative mining pool."""
        return self._p("mining", "pool.json")

    # --- inference / outputs ---
    @property
    def probabilities(self) -> str:
        """Folder of the probability tiles: ``<probabilities>/<z>/<x>/<y>.png``."""
        return self._p("predict", "probs")

    def probability(self, tile: Tile) -> str:
        """uint8 PNG of foreground probability x 255 (one band per class)."""
        return self._p("predict", "probs", str(tile.z), str(tile.x), f"{tile.y}.png")

    @property
    def predict_meta(self) -> str:
        """Classes of the probability bands and the model that made them."""
        return self._p("predict", "meta.json")

    def vector_pieces(self, batch: str) -> str:
        """Polygons of one vectorize batch before the cross-tile merge (GeoParquet-like)."""
        return self._p("predict", "pieces", f"{batch}.parquet")

    def dedup_part(self, class_name: str, filename: str) -> str:
        """Per-class dedup results (candidates, unsupported, grid) before the review files."""
        return self._p("dedup", class_name, filename)

    @property
    def predictions(self) -> str:
        return self._p("predictions.geojson")

    def output(self, filename: str) -> str:
        """Review outputs at the top of the run dir (candidates.geojson, ...)."""
        return self._p(filename)
