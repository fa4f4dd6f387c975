"""``mapgap demo``: the whole pipeline on a synthetic town, offline.

The town's imagery is served by a local XYZ tile server on 127.0.0.1 so the
real HTTP fetch path runs; 10-15% of its buildings are withheld from the OSM
file, and the demo ends by measuring how many of them the candidates recover.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from mapgap import conf, storage
from mapgap.conf.schema import PipelineConfig, load_config

DEMO_YAML = Path(conf.__file__).resolve().parent / "demo.yaml"


def demo_overrides(scene: Any, tile_url: str, out: Path) -> dict[str, Any]:
    """What `mapgap demo` fills into conf/demo.yaml for a generated scene."""
    return {
        "storage": {"root": str(out)},
        "aoi": list(scene.bbox),
        "zoom": scene.zoom,
        # The scene knows which tiles are fully mapped (its validated tasks).
        "labels": {"source": str(scene.pbf), "complete_areas": str(scene.complete_areas)},
        "imagery": {"source": tile_url},
    }


def demo_config(scene: Any, tile_url: str, out: Path) -> PipelineConfig:
    return load_config(DEMO_YAML, demo_overrides(scene, tile_url, out))


def write_resolved_config(cfg: PipelineConfig, path: Path) -> None:
    """Save the filled-in config so single stages can be rerun by hand."""
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    header = "# Written by `mapgap demo`; its tile server URL is only live during the demo.\n"
    storage.write_text(str(path), header + yaml.safe_dump(data, sort_keys=False))


def run_demo(out: Path, seed: int) -> dict[str, Any]:
    from mapgap.demo_scene import generate_scene
    from mapgap.flows.pipeline import pipeline_flow
    from mapgap.orchestration import configured
    from mapgap.tasks.evaluate import evaluate_run
    from mapgap.tileserver import TileServer

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(f"[demo] generating the synthetic town (seed {seed}) in {out / 'scene'}")
    scene = generate_scene(out / "scene", seed=seed)
    with TileServer(scene.tiles_dir, "{z}/{x}/{y}.png") as server:
        print(f"[demo] imagery served at {server.url_template}")
        cfg = demo_config(scene, server.url_template, out)
        write_resolved_config(cfg, out / "demo.yaml")
        summary = configured(pipeline_flow, cfg)(cfg)
    result = evaluate_run(cfg.run_uri, building_truth(scene), scene.withheld)
    result["minutes"] = round((time.monotonic() - t0) / 60, 2)
    storage.write_json(str(out / "demo-result.json"), {"stages": summary, **result})
    print(json.dumps({"stages": summary}, indent=2, default=str))
    print_outcome(result, cfg.run_uri)
    return result


def building_truth(scene: Any) -> Path:
    """The rendered buildings alone (truth.geojson also holds roads, trees...)."""
    data = json.loads(Path(scene.truth).read_text())
    data["features"] = [f for f in data["features"] if f["properties"].get("class") == "building"]
    path = Path(scene.root) / "truth_buildings.geojson"
    storage.write_json(str(path), data)
    return path


def print_outcome(result: dict[str, Any], run_uri: str) -> None:
    """The demo's point in two lines: missing buildings found, and at what precision."""
    found = result["candidates_vs_withheld"]
    every = result["predictions_vs_truth"]
    print(f"[demo] withheld buildings recovered by candidates: {found['tp']}/{found['truth']}"
          f" (recall {_num(found['recall'])}); candidates matching a withheld building:"
          f" {found['tp']}/{found['predictions']} (precision {_num(found['precision'])})")
    print(f"[demo] all predicted buildings vs the full truth: F1 {_num(every['f1'])}"
          f" (precision {_num(every['precision'])}, recall {_num(every['recall'])});"
          f" {result['minutes']} min")
    print(f"[demo] review: {storage.join(run_uri, 'review.html')} and candidates.osm (JOSM)")


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"
