"""Synthetic, seeded demo town: OSM extract, aerial imagery and ground truth, fully offline."""

from mapgap.demo_scene.generate import SceneFiles, generate_scene

__all__ = ["SceneFiles", "generate_scene"]
