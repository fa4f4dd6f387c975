"""Scale-out runs on an existing engine: the inference flow on a Dask
LocalCluster with 2 worker processes writes the same outputs as the default
thread runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mapgap import storage
from mapgap.layout import RunLayout
from tests.helpers_inference import SIZE, make_config, write_mosaic


def random_checkpoint(path: Path) -> str:
    """A real (untrained, seeded) model: non-trivial probabilities everywhere."""
    from mapgap.models.segmentation import SegmentationModel, save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(SegmentationModel(["building"], width=4, depth=2), str(path))


def run_predict(tmp_path: Path, runner: dict) -> dict[str, bytes]:
    from mapgap.flows.predict import predict_flow
    from mapgap.orchestration import configured

    ckpt = random_checkpoint(tmp_path / "model.pt")
    cfg = make_config(tmp_path, cols=3, rows=2, runner=runner,
                      # Same intra-op threads on both engines (Dask workers default to
                      # 1): float sums in another order may round a probability otherwise.
                      inference={"model": ckpt, "tiles_per_task": 2, "loader_workers": 0,
                                 "threads": 1, "threshold": 0.5, "min_area_m2": 0})
    rng = np.random.default_rng(7)
    mosaic = rng.integers(0, 255, (2 * SIZE, 3 * SIZE, 3), dtype=np.uint8)
    mosaic[100:300, 200:600] = 250  # a bright block across tile borders
    write_mosaic(RunLayout(cfg.run_uri), mosaic)
    summary = configured(predict_flow, cfg)(cfg)
    assert summary["batches"] == 3
    root = Path(cfg.run_uri)
    files = sorted(root.glob("predict/probs/**/*.png")) + [root / "predictions.geojson"]
    return {str(p.relative_to(root)): storage.read_bytes(str(p)) for p in files}


@pytest.mark.slow
def test_dask_runner_gives_the_same_outputs(tmp_path: Path) -> None:
    default = run_predict(tmp_path / "thread", {"kind": "thread", "workers": 2})
    dask = run_predict(tmp_path / "dask", {"kind": "dask", "workers": 2})
    assert len(default) == 7  # 6 probability tiles + predictions.geojson
    assert dask == default
