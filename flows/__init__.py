"""mapgap package."""
