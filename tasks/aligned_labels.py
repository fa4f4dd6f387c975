"""Which labels the stages use: the harvested ones, or the align stage's shifted
copies (``labels/aligned/``) when alignment is on and they were made from the
labels harvested now.

A small module of its own because harvest (masks), pack (its cache key) and
dedup (OSM) ask this question, and none of them needs the alignment maths.
"""

from __future__ import annotations

from typing import Any

from mapgap import storage
from mapgap.layout import RunLayout


def aligned_dir(layout: RunLayout) -> str:
    return storage.join(layout.root, "labels", "aligned")


def aligned_summary_uri(layout: RunLayout) -> str:
    """Per class: the aligned GeoParquet (uri, sha256, features), the sha256 of the
    harvested labels it was made from and the offsets applied."""
    return storage.join(aligned_dir(layout), "summary.json")


def read_aligned(layout: RunLayout) -> dict[str, Any]:
    uri = aligned_summary_uri(layout)
    return storage.read_json(uri) if storage.exists(uri) else {}


def current_labels(layout: RunLayout, harvested: dict[str, dict[str, Any]], aligned: bool
                   ) -> dict[str, dict[str, str]]:
    """Class -> {uri, sha256} of the labels to use: with ``aligned``, a class's
    shifted copy when it was made from the harvested labels of now (same sha256),
    else the harvested labels themselves."""
    shifted = read_aligned(layout) if aligned else {}
    out = {}
    for name, entry in harvested.items():
        copy = shifted.get(name)
        use = copy if copy and copy.get("source_sha256") == entry["sha256"] else entry
        out[name] = {"uri": use["uri"], "sha256": use["sha256"]}
    return out


def label_uri(layout: RunLayout, class_name: str, aligned: bool) -> str:
    """The GeoParquet of ``class_name`` to compare predictions with (see
    :func:`current_labels`)."""
    harvested = storage.read_json(layout.labels_summary)["classes"] \
        if storage.exists(layout.labels_summary) else {}
    if class_name not in harvested:
        return layout.labels(class_name)
    return current_labels(layout, {class_name: harvested[class_name]}, aligned)[class_name]["uri"]
