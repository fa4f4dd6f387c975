"""Real data: the Kampala zoom-21 OpenAerialMap tiles with their 206 hand-drawn
buildings. Masks come from the real harvest flow, shards from the real pack
flow, the model from the real train flow; a short CPU training must reach a
building IoU far above the trivial models (all background: IoU 0; all
building: IoU = the val building fraction)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mapgap import grid, storage
from mapgap.conf import load_config
from mapgap.layout import RunLayout
from mapgap.tasks.shards import png_bytes
from tests.conftest import REPO, shared_path

TRAIN = {"epochs": 8, "steps_per_epoch": 25, "batch_size": 8, "crop_size": 128, "width": 16,
         "depth": 4, "lr": 0.003, "loss": "ce_lovasz", "num_workers": 1, "preview_samples": 3}


def kampala_run(data: Path, root: Path) -> object:
    """conf/kampala.yaml (its 12 x 8 block of zoom-21 tiles) in a temp root, with the
    imagery decoded by content (some .png are JPEG bytes) into the run dir as RGB
    PNG, as the fetch stage stores it."""
    cfg = load_config(REPO / "conf" / "kampala.yaml",
                      {"storage": {"root": str(root)}, "train": TRAIN})
    layout = RunLayout(cfg.run_uri)
    for tile in grid.tiles_for_geometry(cfg.aoi_geometry, cfg.zoom):
        path = data / f"OAM-{tile.x}-{tile.y}-{tile.z}.png"
        if path.exists():
            rgb = np.asarray(Image.open(path).convert("RGB"))
            storage.write_bytes(layout.image(tile), png_bytes(rgb))
    return cfg


@pytest.mark.slow
def test_kampala_buildings(tmp_path: Path) -> None:
    from mapgap.flows.harvest import harvest_flow
    from mapgap.flows.pack import pack_flow
    from mapgap.flows.train import train_flow
    from mapgap.orchestration import configured

    data = shared_path("kampala")
    cfg = kampala_run(data, tmp_path)
    t0 = time.monotonic()
    configured(harvest_flow, cfg)(cfg)  # labels.geojson -> GeoParquet -> masks
    packed = configured(pack_flow, cfg)(cfg)
    t_pack = time.monotonic() - t0
    manifest = storage.read_json(RunLayout(cfg.run_uri).manifest)
    val = manifest["splits"]["val"]
    assert packed["skipped"] == {} and val["samples"] > 0
    val_fraction = val["class_pixels"]["building"] / (val["samples"] * 256 * 256)

    t0 = time.monotonic()
    result = configured(train_flow, cfg)(cfg)
    t_train = time.monotonic() - t0
    iou = result["val_metrics"]["val/iou_building"]
    report = {"val_iou_building": round(iou, 3),
              "val_f1_building": round(result["val_metrics"]["val/f1_building"], 3),
              "all_building_iou": round(val_fraction, 3), "all_background_iou": 0.0,
              "train_samples": manifest["splits"]["train"]["samples"],
              "val_samples": val["samples"], "pack_s": round(t_pack, 1),
              "train_s": round(t_train, 1), "settings": TRAIN}
    print("kampala:", json.dumps(report))
    assert iou > max(0.4, val_fraction + 0.15), report
