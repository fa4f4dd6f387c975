"""Scale-out runs on an existing engine: the inference flow on a Dask
LocalCluster with 2 worker processes writes the same outputs as the default
thread runner."""

from __future__ import annotations

import sys
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


@pytest.mark.slow
def test_ray_runner_gives_the_same_outputs(tmp_path: Path) -> None:
    pytest.importorskip("prefect_ray", reason="the optional extra: pip install 'mapgap[ray]'")
    default = run_predict(tmp_path / "thread", {"kind": "thread", "workers": 2})
    ray = run_predict(tmp_path / "ray", {"kind": "ray", "workers": 2})
    assert len(default) == 7 and ray == default


def test_ray_runner_comes_from_the_config_or_its_extra_is_named(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`runner.kind: ray` builds prefect-ray's RayTaskRunner sized by runner.workers
    (or on a cluster's address); without the optional extra, one line says how to
    install it."""
    from mapgap.conf.schema import RunnerConfig
    from mapgap.orchestration import task_runner_for

    local = RunnerConfig(kind="ray", workers=3)
    remote = RunnerConfig(kind="ray", address="ray://10.0.0.5:10001")
    ray_runner = pytest.importorskip("prefect_ray", reason="pip install 'mapgap[ray]'")
    built = task_runner_for(local)
    assert isinstance(built, ray_runner.RayTaskRunner) and built.init_kwargs["num_cpus"] == 3
    assert task_runner_for(remote).address == "ray://10.0.0.5:10001"
    monkeypatch.setitem(sys.modules, "prefect_ray", None)  # as if the extra were absent
    with pytest.raises(RuntimeError, match=r"pip install 'mapgap\[ray\]'"):
        task_runner_for(local)
