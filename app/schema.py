"""Customer, profile and segmentation schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, JsonValue, StringConstraints
from pydantic_core import PydanticCustomError

from app.ml.preprocess import FEATURE_RANGES, SEX_VALUES
from app.segmentations.explain_schemas import Explanation, ExplanationField
from app.versions.identity_schemas import SegmentMatch

MAX_BATCH_ROWS = 10_000


def _canonical_sex(value: Any) -> Any:
    # Case-insensitive in, canonical out; anything that is not a known word fails the Literal below.
    if isinstance(value, str):
        for canonical in SEX_VALUES:
            if value.strip().lower() == canonical.lower():
                return canonical
    return value


def _whole_number(value: Any) -> Any:
    # JSON has one number type and JSON Schema counts 79.0 as an integer; 79.5, "79" and true stay errors.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _not_null(value: Any) -> Any:
    if value is None:
        raise PydanticCustomError("not_null", "May be left out, but not sent as null")
    return value


NotNull = BeforeValidator(_not_null)
"""For a field that may be left out but never sent as null (its default None means "left out")."""


def omittable(schema: dict[str, Any]) -> None:
    """The schema of a NotNull field: its own type without the null its Python default needs."""
    schema.pop("default", None)
    variants = schema.pop("anyOf", None)
    if variants is not None:
        kept = [variant for variant in variants if variant.get("type") != "null"]
        if len(kept) == 1:
            schema.update(kept[0])
        else:
            schema["anyOf"] = kept


def _bounds(feature: str) -> dict[str, float]:
    low, high = FEATURE_RANGES[feature]
    return {"ge": low, "le": high}


Sex = Annotated[Literal["Male", "Female", "Other"], BeforeValidator(_canonical_sex)]
WholeNumber = BeforeValidator(_whole_number)
Age = Annotated[int, Field(strict=True, description="Years", **_bounds("age")), WholeNumber]
AnnualIncome = Annotated[
    float,
    Field(
        strict=True, allow_inf_nan=False, description="Thousands per year (65.5 = 65,500)", **_bounds("annual_income")
    ),
]
SpendingScore = Annotated[
    int, Field(strict=True, description="Spending behaviour score", **_bounds("spending_score")), WholeNumber
]
PurchaseFrequency = Annotated[
    int, Field(strict=True, description="Purchases per year", **_bounds("purchase_frequency")), WholeNumber
]
ProfileName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Notes = Annotated[str, StringConstraints(max_length=2000)]

CUSTOMER_EXAMPLE: dict[str, JsonValue] = {
    "sex": "Female",
    "age": 29,
    "annual_income": 85.0,
    "spending_score": 82,
    "purchase_frequency": 40,
}


VERSION_EXAMPLE = "20250131-093000-a1b2c3"
SEGMENT_EXAMPLE: dict[str, JsonValue] = {
    "cluster_id": 4,
    "cluster_name": "High income, high spending",
    "size": 119,
    "percentage": 14.88,
    "avg_age": 37.2,
    "avg_income": 118.4,
    "avg_spending_score": 80.1,
    "avg_purchase_frequency": 41.3,
    "description": "14.9% of customers: aged 37 on average, earning 118.4k a year (well above average), with a "
    "spending score of 80 (well above average) and 41 purchases a year (above average).",
}
MODEL_VERSION_EXAMPLE: dict[str, JsonValue] = {
    "version": VERSION_EXAMPLE,
    "created_at": "2025-01-31T09:30:00Z",
    "created_by": "analyst1",
    "n_clusters": 5,
    "silhouette_score": 0.4475,
    "inertia": 1203.7,
    "n_samples": 5000,
    "active": True,
    "data_fingerprint": "ae01150e5fef70479eccf03f0e188a3538c4dfab9a2cd5a558240f5eee7a5cc2",
}
PNG_EXAMPLE = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA..."


class CustomerFeatures(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [CUSTOMER_EXAMPLE]})

    sex: Sex
    age: Age
    annual_income: AnnualIncome
    spending_score: SpendingScore
    purchase_frequency: PurchaseFrequency


class ProfileCreate(CustomerFeatures):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"name": "Jane at the downtown store", **CUSTOMER_EXAMPLE, "notes": "Prefers email offers"}]
        }
    )

    name: ProfileName
    notes: Notes | None = None


class ProfileUpdate(BaseModel):
    """Any subset of a profile's fields; those left out keep their value."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"spending_score": 64, "notes": "Moved away"}]})

    # Each may be left out; only `notes` may be null (to clear it).
    name: Annotated[ProfileName | None, NotNull] = Field(None, json_schema_extra=omittable)
    sex: Annotated[Sex | None, NotNull] = Field(None, json_schema_extra=omittable)
    age: Annotated[Age | None, NotNull] = Field(None, json_schema_extra=omittable)
    annual_income: Annotated[AnnualIncome | None, NotNull] = Field(None, json_schema_extra=omittable)
    spending_score: Annotated[SpendingScore | None, NotNull] = Field(None, json_schema_extra=omittable)
    purchase_frequency: Annotated[PurchaseFrequency | None, NotNull] = Field(None, json_schema_extra=omittable)
    notes: Notes | None = None


class ProfilePublic(BaseModel):
    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": 12,
                    "user_id": 7,
                    "name": "Jane at the downtown store",
                    **CUSTOMER_EXAMPLE,
                    "notes": "Prefers email offers",
                    "created_at": "2025-01-31T09:30:00Z",
                    "updated_at": "2025-01-31T09:30:00Z",
                    "cluster": 0,
                    "cluster_name": "Young, high spending, frequent buyers",
                }
            ]
        },
    )

    id: int
    user_id: int
    name: str
    sex: str
    age: int
    annual_income: float
    spending_score: int
    purchase_frequency: int
    notes: str | None
    created_at: datetime
    updated_at: datetime
    cluster: int | None = None
    cluster_name: str | None = None


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
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "cluster": 4,
                    "cluster_name": "High income, high spending",
                    "confidence": 0.62,
                    "customer_data": CUSTOMER_EXAMPLE,
                    "model_version": VERSION_EXAMPLE,
                }
            ]
        }
    )

    customer_data: CustomerFeatures
    model_version: str
    explanation: Explanation | None = ExplanationField


class BatchUpload(BaseModel):
    """POST /predict/batch: customers as a JSON object, or a CSV file in a multipart form."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"customers": [CUSTOMER_EXAMPLE]}]})

    customers: Annotated[list[CustomerFeatures], Field(min_length=1, max_length=MAX_BATCH_ROWS)] | None = Field(
        None, description="JSON only: the customers to score"
    )
    file: UploadFile | None = Field(None, description="Multipart only: a CSV file of customers")


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


class SegmentStats(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [SEGMENT_EXAMPLE]})

    cluster_id: int
    cluster_name: str
    size: int
    percentage: float
    avg_age: float
    avg_income: float
    avg_spending_score: float
    avg_purchase_frequency: float
    description: str


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


MAX_PAGE_SIZE = 200


class HistoryQuery(BaseModel):
    """The query of GET /history: whose history, and which page of it."""

    model_config = ConfigDict(frozen=True)

    user_id: int | None = Field(
        None, gt=0, le=2**31 - 1, description="Another user's history (analysts and admins); absent: your own"
    )
    skip: int = Field(0, ge=0, le=2**31 - 1, description="Rows to skip (with `before_id`: counted from that row)")
    limit: int = Field(50, ge=1, le=MAX_PAGE_SIZE, description=f"Rows to return, at most {MAX_PAGE_SIZE}")
    before_id: int | None = Field(
        None,
        gt=0,
        le=2**31 - 1,
        description=(
            "Only rows older than this one (a history item's `id`, usually the last page's `next_before_id`): "
            "a page as fast deep in a long history as at its start, and not shifted by new predictions. "
            "`skip` then counts from that row. An id that is not in this history is a 404."
        ),
    )
    segmentation: Annotated[str | None, NotNull] = Field(
        None,
        min_length=1,
        max_length=40,
        description="Only the predictions made with this segmentation",
        json_schema_extra=omittable,
    )


class ElbowRange(BaseModel):
    """The query of GET /elbow: the range of k to report on."""

    model_config = ConfigDict(frozen=True)

    k_min: int = Field(2, ge=2, le=15)
    k_max: int = Field(10, ge=2, le=15)


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


class TrainResult(BaseModel):
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
    previous_version: str | None = Field(
        None, description="The version this one was matched to (the active one when it was trained); null if none"
    )
    matching: list[SegmentMatch] = []
    retired_cluster_ids: list[int] = Field(
        [], description="Ids of the previous version's segments that no segment of this version continues"
    )


HISTORY_EXAMPLE: dict[str, JsonValue] = {
    "id": 31,
    "customer_data": CUSTOMER_EXAMPLE,
    "cluster": 4,
    "cluster_name": "High income, high spending",
    "confidence": 0.62,
    "model_version": VERSION_EXAMPLE,
    "created_at": "2025-01-31T09:30:00Z",
    "segmentation": "default",
}


class HistoryItem(BaseModel):
    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [HISTORY_EXAMPLE]})

    id: int
    customer_data: dict[str, Any]
    cluster: int
    cluster_name: str
    confidence: float
    model_version: str | None
    created_at: datetime
    segmentation: str = "default"


class HistoryPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"history": [HISTORY_EXAMPLE], "total": 1, "skip": 0, "limit": 50, "next_before_id": None}]
        }
    )

    history: list[HistoryItem]
    total: int
    skip: int
    limit: int
    next_before_id: int | None = Field(
        None, description="The `before_id` that reads the next (older) page; null on the last page"
    )


class ModelVersionPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [MODEL_VERSION_EXAMPLE]})

    version: str
    created_at: datetime
    created_by: str | None
    n_clusters: int
    silhouette_score: float | None
    inertia: float
    n_samples: int
    active: bool
    data_fingerprint: str | None = None


class ModelVersionDetail(ModelVersionPublic):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **MODEL_VERSION_EXAMPLE,
                    "clusters": [SEGMENT_EXAMPLE],
                    "k_selection": {"method": "silhouette", "k_range": [2, 3, 4, 5, 6], "optimal_k": 5},
                    "features": ["age", "annual_income", "spending_score", "purchase_frequency"],
                    "trained_at": "2025-01-31T09:30:00+00:00",
                    "library_versions": {"scikit-learn": "1.5.2", "numpy": "2.1.3"},
                }
            ]
        }
    )

    clusters: list[SegmentStats] = []
    k_selection: dict[str, Any] | None = None
    features: list[str] = []
    trained_at: str | None = None
    library_versions: dict[str, str] = {}
    algorithm: str | None = Field(
        None, description="kmeans, minibatch_kmeans, or streamed_kmeans (trained out of core from a file)"
    )
    out_of_core: dict[str, Any] | None = Field(
        None, description="For a version trained out of core: the file's format, the sample k was chosen on, the passes"
    )
    previous_version: str | None = Field(
        None, description="The version this one was matched to (the active one when it was trained); null if none"
    )
    matching: list[SegmentMatch] = []
    retired_cluster_ids: list[int] = Field(
        [], description="Ids of the previous version's segments that no segment of this version continues"
    )


class ModelList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"models": [MODEL_VERSION_EXAMPLE], "active_version": VERSION_EXAMPLE}]}
    )

    models: list[ModelVersionPublic]
    active_version: str | None


class AdminStats(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "total_users": 12,
                    "active_users": 11,
                    "inactive_users": 1,
                    "total_predictions": 340,
                    "total_profiles": 25,
                    "users_by_role": {"user": 9, "analyst": 2, "admin": 1},
                    "predictions_by_cluster": {"1": 220, "4": 120},
                    "model": {
                        "version": VERSION_EXAMPLE,
                        "n_clusters": 5,
                        "silhouette_score": 0.4475,
                        "n_samples": 5000,
                        "trained_at": "2025-01-31T09:30:00+00:00",
                        "cluster_names": {"1": "Senior, low income, low spending", "4": "High income, high spending"},
                    },
                }
            ]
        }
    )

    total_users: int
    active_users: int
    inactive_users: int
    total_predictions: int
    total_profiles: int
    users_by_role: dict[str, int]
    predictions_by_cluster: dict[str, int]
    model: dict[str, Any] | None
    segmentations: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Every segmentation: `{name, kind, active_version, predictions, drift_status}`",
    )


class Health(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "healthy",
                    "message": "Customer Segmentation API is running",
                    "version": "1.0.0",
                    "model_loaded": True,
                    "model_version": VERSION_EXAMPLE,
                }
            ]
        }
    )

    status: Literal["healthy"] = "healthy"
    message: str = "Customer Segmentation API is running"
    version: str
    model_loaded: bool
    model_version: str | None
