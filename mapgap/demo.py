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

from mapgap import conf
from mapgap.conf.schema import PipelineConfig, load_config

DEMO_YAML = Path(conf.__file__).resolve().parent / "demo.yaml"


def demo_overrides(scene: Any, tile_url: str, out: Path) -> dict[str, Any]:
    """What `mapgap demo` fills into conf/demo.yaml for a generated scene."""
    return {
        "storage": {"root": str(out)},
        "aoi": list(scene.bbox),
        "zoom": scene.zoom,
        "labels": {"source": str(scene.pbf)},
        "imagery": {"source": tile_url},
    }


def demo_config(scene: Any, tile_url: str, out: Path) -> PipelineConfig:
    return load_config(DEMO_YAML, demo_overrides(scene, tile_url, out))


def write_resolved_config(cfg: PipelineConfig, path: Path) -> None:
    """Save the filled-in config so single stages can be rerun by hand."""
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    header = "# Written by `mapgap demo`; its tile server URL is only live during the demo.\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))


def run_demo(out: Path, seed: int) -> dict[str, Any]:
    from mapgap.demo_scene import generate_scene
    from mapgap.flows.pipeline import pipeline_flow
    from mapgap.orchestration import configured
    from mapgap.tasks.evaluate import evaluate_demo
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
    result = evaluate_demo(cfg, scene)
    result["minutes"] = round((time.monotonic() - t0) / 60, 2)
    (out / "demo-result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"stages": summary, "evaluation": result}, indent=2, default=str))
    return result
