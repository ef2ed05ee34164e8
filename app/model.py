"""The K-Means customer segmentation model; kept for its importers, the code lives in :mod:`app.ml`."""

from app.ml import KMEANS_FILE, METADATA_FILE, SCALER_FILE, ModelLoadError, SegmentationModel, elbow, segment_names

__all__ = [
    "KMEANS_FILE",
    "METADATA_FILE",
    "SCALER_FILE",
    "ModelLoadError",
    "SegmentationModel",
    "elbow",
    "segment_names",
]
