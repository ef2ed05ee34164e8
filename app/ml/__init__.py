"""The ML core: feature schema, choosing k, K-Means fit and scoring, names, persistence.

No FastAPI, no database; everything blocks, so the web app calls it from
worker threads.
"""

from app.ml.errors import DataValidationError, MLError, SchemaError
from app.ml.estimator import SegmentationModel
from app.ml.frames import read_training_frame
from app.ml.naming import segment_names
from app.ml.persistence import KMEANS_FILE, METADATA_FILE, SCALER_FILE, ModelLoadError
from app.ml.schema import Feature, FeatureSchema
from app.ml.scoring import ScoredFrame, ScoredRecords
from app.ml.selection import elbow

__all__ = [
    "KMEANS_FILE",
    "METADATA_FILE",
    "SCALER_FILE",
    "Feature",
    "FeatureSchema",
    "DataValidationError",
    "MLError",
    "ModelLoadError",
    "SchemaError",
    "ScoredFrame",
    "ScoredRecords",
    "SegmentationModel",
    "elbow",
    "read_training_frame",
    "segment_names",
]
