"""mapgap: find what OpenStreetMap is missing from aerial imagery."""

__version__ = "0.1.0"
