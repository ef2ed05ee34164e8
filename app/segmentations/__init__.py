"""Segmentations: named lines of model versions, each of one kind (app.segmentations.kinds)."""
