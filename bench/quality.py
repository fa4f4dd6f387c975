"""Model quality on real imagery: from-scratch U-Net vs the bundled pretrained encoder.

Kampala (../shared/data/kampala: OpenAerialMap zoom-21 tiles, 206 hand-drawn
buildings), conf/kampala.yaml as shipped except the model; both trainings get the
same wall-clock budget (``--minutes``, default 10) on this CPU, through the real
fetch, harvest, pack and train flows. Scores on the val split: pixel IoU over all
val tiles and object precision / recall / F1 at IoU 0.5 (the val tiles polygonized
exactly as predict does, with the threshold and minimum area calibrated on val).
Prints one row per model and ``kampala_object_f1=<best object F1>`` last
(goal >= 0.70, with pixel IoU >= 0.75).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KAMPALA = REPO.parent / "shared" / "data" / "kampala"
MODELS = {
    "scratch": {"architecture": "scratch"},
    "pretrained": {"architecture": "unet", "encoder": "efficientnet_lite0",
                   "encoder_weights": "bundled"},
}


def train_one(root: Path, name: str, minutes: float,
              overrides: dict[str, Any]) -> dict[str, Any]:
    from mapgap.conf import load_config
    from mapgap.flows.fetch import fetch_flow
    from mapgap.flows.harvest import harvest_flow
    from mapgap.flows.pack import pack_flow
    from mapgap.flows.train import train_flow
    from mapgap.orchestration import configured

    train = {**MODELS[name], "epochs": 1000, "max_minutes": minutes, "val_batches": None,
             "object_val_tiles": 10_000, **overrides}
    cfg = load_config(REPO / "conf" / "kampala.yaml",
                      {"storage": {"root": str(root)}, "train": train})
    for stage in (fetch_flow, harvest_flow, pack_flow):  # cached after the first model
        configured(stage, cfg)(cfg)
    t0 = time.monotonic()
    result = configured(train_flow, cfg)(cfg)
    m = result["val_metrics"]
    return {"model": name, "train_s": round(time.monotonic() - t0), "epochs": result["epochs"],
            "pixel_iou": m["val/iou"], "object_precision": m["val/object_precision"],
            "object_recall": m["val/object_recall"], "object_f1": m["val/object_f1"],
            "calibrated_f1": (result.get("calibration") or {}).get("object_f1")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per model")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--train", type=json.loads, default={},
                        help='train settings to try, as JSON: \'{"crop_size": 256}\'')
    args = parser.parse_args()
    if not KAMPALA.exists():
        print(f"skipped: {KAMPALA} not found (see ../shared/data/README.md)")
        print("kampala_object_f1=nan")
        sys.exit(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mapgap-quality-") as tmp:
        for name in args.models:
            rows.append(train_one(Path(tmp), name, args.minutes, args.train))
    print(f"{'model':<11} {'train s':>7} {'epochs':>6} {'pixel IoU':>9} {'obj P':>6} "
          f"{'obj R':>6} {'obj F1':>6} {'calib F1':>8}")
    for r in rows:
        calibrated = "-" if r["calibrated_f1"] is None else f"{r['calibrated_f1']:.3f}"
        print(f"{r['model']:<11} {r['train_s']:>7} {r['epochs']:>6} {r['pixel_iou']:>9.3f} "
              f"{r['object_precision']:>6.3f} {r['object_recall']:>6.3f} "
              f"{r['object_f1']:>6.3f} {calibrated:>8}")
    best = max(max(r["object_f1"], r["calibrated_f1"] or 0.0) for r in rows)
    print(f"kampala_object_f1={best:.3f}")


if __name__ == "__main__":
    main()
