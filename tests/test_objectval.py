"""Object-level validation on real files: a scene whose imagery IS the probability
map a known model outputs, so the object F1 the pipeline reports is known.

The imagery is cut into real PNG tiles, the labels written as the harvest stage
writes them (GeoParquet), and ``ChannelNet`` is a real torch model with the
Contract 1 interface that reads its probabilities from the image channels. So
every number below comes from the real predict -> vectorize -> match path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np
import pytest
import shapely
import torch
from torch import nn

from mapgap.grid import Tile
from mapgap.layout import RunLayout
from mapgap.tasks.geometry import pixels_to_lonlat
from mapgap.tasks.objectval import (
    Calibration,
    ObjectF1Callback,
    ObjectValError,
    calibrate,
    confidence,
    confidence_table,
    mean_scores,
    predict_objects,
    score_objects,
    val_area,
    val_truth,
)
from mapgap.tasks.predict import PredictSettings
from mapgap.tasks.vectorize import VectorSettings
from tests.helpers_inference import ORIGIN, SIZE, Z, write_labels, write_mosaic

COLS, ROWS = 3, 2
VECTOR = VectorSettings(classes=("building",), zoom=Z, tile_size=SIZE, min_area_m2=10.0)
PREDICT = PredictSettings(tile_size=SIZE, batch_size=4, loader_workers=0)


class ChannelNet(nn.Module):
    """A deliberately known model (Contract 1 interface): a fixed 1x1 conv that
    returns image channel k as band k: R = building probability, G = distance."""

    def __init__(self, instances: bool = False) -> None:
        super().__init__()
        self.classes = ["building"]
        self.band_names = self.classes + ["distance"] * instances
        self.pick = nn.Conv2d(3, len(self.band_names), 1, bias=False)
        with torch.no_grad():
            self.pick.weight.copy_(torch.eye(3)[:len(self.band_names), :, None, None])

    def bands(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(x).clamp(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bands(x)[:, :len(self.classes)]


@dataclass(frozen=True)
class Box:
    x0: int  # mosaic pixels
    y0: int
    w: int
    h: int
    value: int  # probability x 255 the model will output inside
    real: bool = True  # in the OSM labels

    def polygon(self) -> shapely.Polygon:
        """Lon/lat outline (through global pixel coordinates of the zoom level)."""
        x, y = ORIGIN.x * SIZE + self.x0, ORIGIN.y * SIZE + self.y0
        return pixels_to_lonlat(np.array([shapely.box(x, y, x + self.w, y + self.h)]), Z,
                                SIZE)[0]


def lattice(value: int = 255) -> list[Box]:
    """143 separate 26x18 px (~9 x 11 m) buildings; some cross tile borders (one
    spans 4 tiles at the mosaic centre column x=256), a column crosses x=512."""
    return [Box(14 + 60 * i, 4 + 48 * j, 26, 18, value) for i in range(13) for j in range(11)]


def write_scene(root, boxes: list[Box]) -> tuple[RunLayout, list[Tile]]:
    layout = RunLayout(str(root / "run"))
    mosaic = np.zeros((ROWS * SIZE, COLS * SIZE, 3), np.uint8)
    for b in boxes:
        mosaic[b.y0:b.y0 + b.h, b.x0:b.x0 + b.w] = b.value
    tiles = write_mosaic(layout, mosaic)
    write_labels(layout, [b.polygon() for b in boxes if b.real])
    return layout, tiles


def west_tiles(tiles: list[Tile]) -> list[Tile]:
    """The first two tile columns: the val area edge cuts the x=494..520 column."""
    return [t for t in tiles if t.x < ORIGIN.x + 2]


def objects_f1(layout: RunLayout, tiles: list[Tile], v: VectorSettings = VECTOR,
               model: nn.Module | None = None) -> dict:
    truth = val_truth(layout, ["building"], tiles, v.min_area_m2)
    objects = predict_objects(layout, tiles, model or ChannelNet(), [v], PREDICT)[0]
    return score_objects(objects, truth)["building"]


# --- object F1 of known probabilities ------------------------------------------------------

@pytest.mark.parametrize("instances", [False, True], ids=["classes", "with-distance-band"])
def test_perfect_probabilities_give_object_f1_1_with_the_val_edge_cut(tmp_path,
                                                                      instances) -> None:
    # Plus one building with a 1 px (~6 m2) sliver inside the val area: below the
    # minimum area on both sides, so it is neither a miss nor a false positive.
    sliver = Box(511, 28, 26, 18, 255)
    layout, tiles = write_scene(tmp_path, [*lattice(), sliver])
    val = west_tiles(tiles)
    truth = val_truth(layout, ["building"], val, VECTOR.min_area_m2)["building"]
    area = val_area(val)
    assert shapely.covered_by(truth, area).all()
    east = area.bounds[2]
    cut = [g for g in truth if abs(g.bounds[2] - east) < 1e-9]
    assert len(cut) == 11  # the x=494..520 column, cut like the predictions; no sliver
    m = objects_f1(layout, val, model=ChannelNet(instances))
    assert (m["f1"], m["precision"], m["recall"]) == (1.0, 1.0, 1.0)
    assert m["tp"] == len(truth) == 9 * 11  # buildings across tile borders are one each


def test_half_the_buildings_erased_gives_recall_one_half(tmp_path) -> None:
    boxes = lattice()
    shown = [replace(b, value=255 if k % 2 == 0 else 0) for k, b in enumerate(boxes)]
    layout, tiles = write_scene(tmp_path, shown)
    m = objects_f1(layout, tiles)
    assert m["precision"] == 1.0 and m["truth"] == len(boxes)
    assert abs(m["recall"] - 0.5) < 0.01


def test_wrong_outlines_do_not_match(tmp_path) -> None:
    """Probabilities shifted by more than half a building: IoU < 0.5 everywhere."""
    boxes = lattice()
    layout, tiles = write_scene(tmp_path, [replace(b, real=False) for b in boxes])
    write_labels(layout, [replace(b, x0=b.x0 + 16).polygon() for b in boxes])
    m = objects_f1(layout, tiles)
    assert m["tp"] == 0 and m["f1"] == 0.0 and m["predictions"] == len(boxes)


# --- calibration ---------------------------------------------------------------------------

def test_calibration_picks_threshold_and_min_area_that_maximise_f1(tmp_path) -> None:
    """Real buildings at probability 0.39 (0.5 finds none) and unlabelled 7x7 px
    (~17 m2) specks at the same probability (only a larger minimum area drops them)."""
    boxes = lattice(100)
    specks = [Box(b.x0 + 40, b.y0 + 5, 7, 7, 100, real=False) for b in boxes[::3]
              if b.x0 + 47 < COLS * SIZE]
    layout, tiles = write_scene(tmp_path, boxes + specks)
    truth = val_truth(layout, ["building"], tiles, VECTOR.min_area_m2)
    assert objects_f1(layout, tiles)["f1"] == 0.0  # the configured threshold 0.5
    cal = calibrate(layout, tiles, ChannelNet(), truth, VECTOR, PREDICT)
    assert cal.threshold <= 100 / 255 and cal.threshold in (0.3, 0.35)
    assert 17.5 < cal.min_area_m2 <= 4 * VECTOR.min_area_m2
    assert (cal.object_f1, cal.precision, cal.recall) == (1.0, 1.0, 1.0)
    at_base_area = objects_f1(layout, tiles, replace(VECTOR, threshold=cal.threshold))
    assert at_base_area["fp"] == len(specks)  # so the min area really was chosen
    assert cal.apply(VECTOR).threshold == cal.threshold


def test_confidence_is_the_val_precision_of_polygons_at_least_as_confident(tmp_path) -> None:
    """Three groups: 0.90 all real, 0.75 half real, 0.60 none real. The chosen
    threshold drops the 0.60 group; precision of score >= 0.90 is 1, of >= 0.75 is
    (n + n/2) / 2n = 0.75."""
    groups = [(230, lambda k: True), (191, lambda k: k % 2 == 0), (153, lambda k: False)]
    boxes = [replace(b, value=groups[k % 3][0], real=groups[k % 3][1](k // 3))
             for k, b in enumerate(lattice())]
    layout, tiles = write_scene(tmp_path, boxes)
    truth = val_truth(layout, ["building"], tiles)
    cal = calibrate(layout, tiles, ChannelNet(), truth, VECTOR, PREDICT)
    assert 153 / 255 < cal.threshold <= 191 / 255
    high, mid = round(230 / 255, 4), round(191 / 255, 4)
    n_high = sum(b.value == 230 for b in boxes)
    n_mid, mid_real = sum(b.value == 191 for b in boxes), sum(b.value == 191 and b.real
                                                              for b in boxes)
    expected_mid = (n_high + mid_real) / (n_high + n_mid)
    assert cal.table == ((mid, round(expected_mid, 4)), (high, 1.0))
    assert cal.confidence(high) == 1.0
    assert cal.confidence(mid) == pytest.approx(expected_mid, abs=1e-4)
    assert cal.precision == pytest.approx(expected_mid, abs=1e-4) and cal.recall == 1.0
    values = [cal.confidence(s) for s in np.linspace(0, 1, 101)]
    assert values == sorted(values) and min(values) >= 0 and max(values) <= 1


def test_confidence_table_is_monotone_and_exact_where_precision_already_is() -> None:
    rng = np.random.default_rng(7)
    scores = rng.uniform(0.3, 1, 500)
    hits = rng.uniform(0, 1, 500) < scores  # more confident, more often right, noisily
    table = confidence_table(scores, hits, knots=24)
    assert 2 <= len(table) <= 24
    xs, ys = zip(*table, strict=True)
    assert list(xs) == sorted(xs) and list(ys) == sorted(ys)
    assert min(ys) >= 0 and max(ys) <= 1
    assert ys[0] == pytest.approx(hits.mean(), abs=1e-4)  # lowest knot: all predictions
    # Already monotone cumulative precision: the table is that precision, knot for knot.
    exact = confidence_table(np.array([0.9, 0.9, 0.8, 0.8, 0.7, 0.7]),
                             np.array([1, 1, 1, 0, 0, 0], bool))
    assert exact == ((0.7, 0.5), (0.8, 0.75), (0.9, 1.0))
    assert confidence(0.85, exact) == pytest.approx(0.875) and confidence(0.1, exact) == 0.5
    # One unlucky top prediction does not send the most confident polygons to 0.
    pooled = confidence_table(np.linspace(0.5, 1, 20), np.r_[np.ones(19, bool), False])
    assert [c for _, c in pooled] == sorted(c for _, c in pooled) and pooled[-1][1] > 0.8
    assert confidence(0.5, ()) == 0.0


def test_calibration_round_trips_through_json_and_bad_input_names_the_field() -> None:
    cal = Calibration(0.35, 15.0, ((0.4, 0.6), (0.9, 0.95)), 0.8, 0.75, 0.86)
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    with pytest.raises(ObjectValError, match=r"^model calibration: missing field\(s\) table$"):
        Calibration.from_dict({k: v for k, v in cal.to_dict().items() if k != "table"},
                              "model calibration")


def test_missing_labels_is_a_clear_error(tmp_path) -> None:
    layout = RunLayout(str(tmp_path / "run"))
    with pytest.raises(ObjectValError, match=r"labels/road.parquet: no harvested labels"):
        val_truth(layout, ["road"], [ORIGIN])


def test_mean_counts_nothing_predicted_as_zero() -> None:
    per_class = {"a": {"truth": 3, "predictions": 0, "f1": 0.0, "precision": None,
                       "recall": 0.0},
                 "b": {"truth": 0, "predictions": 0, "f1": None, "precision": None,
                       "recall": None}}
    assert mean_scores(per_class) == {"f1": 0.0, "precision": 0.0, "recall": 0.0}


# --- during training -----------------------------------------------------------------------

def test_callback_logs_object_f1_in_a_real_lightning_fit(tmp_path) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    layout, tiles = write_scene(tmp_path, lattice())
    val = west_tiles(tiles)
    truth = val_truth(layout, ["building"], val, VECTOR.min_area_m2)

    class Module(L.LightningModule):
        """The known model under a frozen optimiser (lr 0): its F1 stays 1."""

        def __init__(self) -> None:
            super().__init__()
            self.model = ChannelNet()
            self.train_modes: list[bool] = []

        def training_step(self, batch, _):
            self.train_modes.append(self.model.training)
            return self.model(batch[0]).mean()

        def validation_step(self, batch, _):
            self.log("val/loss", self.model(batch[0]).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    data = DataLoader(TensorDataset(torch.rand(4, 3, 32, 32)), batch_size=2)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/object_f1", mode="max")
    module = Module()
    callback = ObjectF1Callback(layout, val, truth, VECTOR, PREDICT)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1,
                        accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=1,
                        callbacks=[callback, best],
                        default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=data, val_dataloaders=data)
    logged = trainer.callback_metrics
    assert float(logged["val/object_f1"]) == 1.0
    assert float(logged["val/object_f1_building"]) == 1.0
    assert float(logged["val/object_precision"]) == float(logged["val/object_recall"]) == 1.0
    assert float(best.best_model_score) == 1.0 and best.best_model_path
    assert module.train_modes == [True] * 4
    # Called in train mode (as by a caller outside Lightning's val loop): restored.
    module.model.train()
    assert callback.measure(module.model, torch.device("cpu"))["val/object_f1"] == 1.0
    assert module.model.training


def test_callback_needs_val_tiles(tmp_path) -> None:
    with pytest.raises(ObjectValError, match="no val tiles"):
        ObjectF1Callback(RunLayout(str(tmp_path)), [], {}, VECTOR, PREDICT)
