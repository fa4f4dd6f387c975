"""Real data: the Kampala zoom-21 OpenAerialMap tiles with their 206 hand-drawn
buildings, run with conf/kampala.yaml as shipped. Tiles come from the real fetch
flow (the local tile folder), masks from the harvest flow, shards from the pack
flow, the model from the train flow; a short CPU training must reach a
building IoU far above the trivial models (all background: IoU 0; all
building: IoU = the val building fraction)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mapgap import storage
from mapgap.conf import load_config
from mapgap.layout import RunLayout
from tests.conftest import REPO, shared_path

KEY_SETTINGS = ("epochs", "steps_per_epoch", "batch_size", "crop_size", "width", "depth", "lr",
                "loss", "num_workers")


def kampala_run(root: Path) -> object:
    """conf/kampala.yaml as it is (its 12 x 8 block of zoom-21 tiles), in a temp root."""
    return load_config(REPO / "conf" / "kampala.yaml", {"storage": {"root": str(root)}})


@pytest.mark.slow
def test_kampala_buildings(tmp_path: Path) -> None:
    from mapgap.flows.fetch import fetch_flow
    from mapgap.flows.harvest import harvest_flow
    from mapgap.flows.pack import pack_flow
    from mapgap.flows.train import train_flow
    from mapgap.orchestration import configured

    shared_path("kampala")
    cfg = kampala_run(tmp_path)
    t0 = time.monotonic()
    fetched = configured(fetch_flow, cfg)(cfg)  # the tile folder, JPEG bytes named .png too
    assert fetched["fetched"] == 96 and fetched["failed"] == fetched["missing"] == 0
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
              "train_s": round(t_train, 1),
              "settings": cfg.train.model_dump(include=set(KEY_SETTINGS))}
    print("kampala:", json.dumps(report))
    assert iou > max(0.4, val_fraction + 0.15), report
