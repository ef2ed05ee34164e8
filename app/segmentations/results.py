"""What segmentation routes answer: assignments, batches, trainings, segments, k and charts."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from app.core.schemas import CUSTOMER_EXAMPLE, PNG_EXAMPLE, VERSION_EXAMPLE
from app.segmentations.explain_schemas import Explanation, ExplanationField
from app.segmentations.kinds.customer_record import CustomerFeatures
from app.versions.schemas import (
    NAMED_SEGMENT_EXAMPLE,
    SEGMENT_EXAMPLE,
    NamedSegmentStats,
    SegmentStats,
    ValueModelFit,
    VersionLineage,
)

PREDICTION_EXAMPLE: dict[str, JsonValue] = {
    "cluster": 4,
    "cluster_name": "High income, high spending",
    "confidence": 0.62,
    "customer_data": CUSTOMER_EXAMPLE,
    "model_version": VERSION_EXAMPLE,
}


class SegmentAssignment(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"cluster": 4, "cluster_name": "High income, high spending", "confidence": 0.62}]
        }
    )

    cluster: int
    cluster_name: str
    confidence: float = Field(ge=0, le=1)


class PredictionResult(SegmentAssignment):
    model_config = ConfigDict(json_schema_extra={"examples": [PREDICTION_EXAMPLE]})

    customer_data: CustomerFeatures
    model_version: str
    explanation: Explanation | None = ExplanationField


class BatchResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "predictions": [
                        {"cluster": 4, "cluster_name": "High income, high spending", "confidence": 0.62},
                        {"cluster": 1, "cluster_name": "Senior, low income, low spending", "confidence": 0.81},
                    ],
                    "model_version": VERSION_EXAMPLE,
                }
            ]
        }
    )

    predictions: list[SegmentAssignment]
    model_version: str


class ClusterSummary(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "total_customers": 800,
                    "n_clusters": 5,
                    "model_version": VERSION_EXAMPLE,
                    "clusters": [SEGMENT_EXAMPLE],
                }
            ]
        }
    )

    total_customers: int
    n_clusters: int
    model_version: str
    clusters: list[SegmentStats]


class ElbowResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "optimal_k": 5,
                    "k_range": [2, 3, 4, 5, 6],
                    "inertias": [1790.2, 1385.9, 1003.1, 697.4, 612.8],
                    "silhouette_scores": [0.371, 0.342, 0.395, 0.448, 0.43],
                    "method": "silhouette",
                }
            ]
        }
    )

    optimal_k: int
    k_range: list[int]
    inertias: list[float]
    silhouette_scores: list[float]
    method: str


class ClusterCharts(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "charts": {"pie_chart": PNG_EXAMPLE, "bar_chart": PNG_EXAMPLE, "size_chart": PNG_EXAMPLE},
                    "total_customers": 800,
                    "n_clusters": 5,
                }
            ]
        }
    )

    charts: dict[str, str] = Field(description="pie_chart, bar_chart and size_chart as data:image/png;base64 URIs")
    total_customers: int
    n_clusters: int


class ElbowChart(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"chart": PNG_EXAMPLE, "optimal_k": 5}]})

    chart: str
    optimal_k: int


class TrainResult(VersionLineage):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "message": "Model trained with 5 segments",
                    "n_clusters": 5,
                    "silhouette_score": 0.4475,
                    "inertia": 1203.7,
                    "model_version": VERSION_EXAMPLE,
                    "n_samples": 5000,
                    "duration_seconds": 0.42,
                    "cluster_sizes": {"0": 850, "1": 1000, "2": 1500, "3": 850, "4": 800},
                }
            ]
        }
    )

    message: str
    n_clusters: int
    silhouette_score: float | None
    inertia: float
    model_version: str
    n_samples: int
    duration_seconds: float
    cluster_sizes: dict[str, int]


class NamedPredictionResult(SegmentAssignment):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{**PREDICTION_EXAMPLE, "segmentation": "default", "warnings": []}]}
    )

    customer_data: dict[str, Any]
    model_version: str
    segmentation: str
    warnings: list[str] = []
    explanation: Explanation | None = ExplanationField
    p_alive: float | None = Field(
        None, description="Kind rfm: P(alive | x, t_x, T) under BG/NBD (1 for a one-time buyer)"
    )
    expected_purchases: float | None = Field(None, description="Kind rfm: purchases expected within `horizon_days`")
    expected_order_value: float | None = Field(None, description="Kind rfm: the Gamma-Gamma expected spend a purchase")
    clv: float | None = Field(
        None, description="Kind rfm: expected_purchases × expected_order_value (undiscounted, over the horizon)"
    )


class NamedTrainResult(TrainResult):
    segmentation: str
    skipped_rows: int = 0
    missing_shares: dict[str, float] = {}
    n_transactions: int | None = Field(None, description="Kind rfm: the log's rows (n_samples counts customers)")
    skipped_customers: int | None = Field(None, description="Kind rfm: customers without a counted purchase")
    rows_after_as_of: int | None = Field(None, description="Kind rfm: rows dated after as_of, left out")
    as_of: str | None = Field(None, description="Kind rfm: the day RFM was computed as of")
    columns: dict[str, str] | None = Field(None, description="Kind rfm: the headers the log's fields were read from")
    value_model: ValueModelFit | None = Field(
        None, description="Kind rfm: the BG/NBD and Gamma-Gamma parameters (null: none could be fitted; see warnings)"
    )
    warnings: list[str] = Field(
        default_factory=list, description="What training could not do (kind rfm: a value model)"
    )


class NamedClusterSummary(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "total_customers": 800,
                    "n_clusters": 5,
                    "model_version": VERSION_EXAMPLE,
                    "segmentation": "default",
                    "clusters": [NAMED_SEGMENT_EXAMPLE],
                }
            ]
        }
    )

    total_customers: int
    n_clusters: int
    model_version: str
    segmentation: str
    clusters: list[NamedSegmentStats]
