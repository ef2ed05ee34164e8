"""Customer, profile and segmentation schemas."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from app.preprocess import FEATURE_RANGES, SEX_VALUES

MAX_BATCH_ROWS = 10_000


def _canonical_sex(value: Any) -> Any:
    # Case-insensitive in, canonical out; anything that is not a known word fails the Literal below.
    if isinstance(value, str):
        for canonical in SEX_VALUES:
            if value.strip().lower() == canonical.lower():
                return canonical
    return value


def _bounds(feature: str) -> dict[str, float]:
    low, high = FEATURE_RANGES[feature]
    return {"ge": low, "le": high}


Sex = Annotated[Literal["Male", "Female", "Other"], BeforeValidator(_canonical_sex)]
Age = Annotated[int, Field(strict=True, description="Years", **_bounds("age"))]
AnnualIncome = Annotated[
    float,
    Field(strict=True, allow_inf_nan=False, description="Thousands per year (65.5 = 65,500)",
          **_bounds("annual_income")),
]
SpendingScore = Annotated[int, Field(strict=True, description="Spending behaviour score",
                                     **_bounds("spending_score"))]
PurchaseFrequency = Annotated[int, Field(strict=True, description="Purchases per year",
                                         **_bounds("purchase_frequency"))]
ProfileName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Notes = Annotated[str, StringConstraints(max_length=2000)]

CUSTOMER_EXAMPLE = {"sex": "Female", "age": 29, "annual_income": 85.0, "spending_score": 82,
                    "purchase_frequency": 40}


class CustomerFeatures(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [CUSTOMER_EXAMPLE]})

    sex: Sex
    age: Age
    annual_income: AnnualIncome
    spending_score: SpendingScore
    purchase_frequency: PurchaseFrequency


class ProfileCreate(CustomerFeatures):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"name": "Jane at the downtown store", **CUSTOMER_EXAMPLE,
                                         "notes": "Prefers email offers"}]}
    )

    name: ProfileName
    notes: Notes | None = None


class ProfileUpdate(BaseModel):
    """Any subset of a profile's fields; those left out keep their value."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"spending_score": 64, "notes": "Moved away"}]})

    name: ProfileName | None = None
    sex: Sex | None = None
    age: Age | None = None
    annual_income: AnnualIncome | None = None
    spending_score: SpendingScore | None = None
    purchase_frequency: PurchaseFrequency | None = None
    notes: Notes | None = None


class ProfilePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

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
    cluster: int
    cluster_name: str
    confidence: float = Field(ge=0, le=1)


class PredictionResult(SegmentAssignment):
    customer_data: CustomerFeatures
    model_version: str


class BatchRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"customers": [CUSTOMER_EXAMPLE]}]})

    customers: Annotated[list[CustomerFeatures], Field(min_length=1, max_length=MAX_BATCH_ROWS)]


class BatchResult(BaseModel):
    predictions: list[SegmentAssignment]
    model_version: str


class SegmentStats(BaseModel):
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
    total_customers: int
    n_clusters: int
    model_version: str
    clusters: list[SegmentStats]


class ElbowResult(BaseModel):
    optimal_k: int
    k_range: list[int]
    inertias: list[float]
    silhouette_scores: list[float]
    method: str


class ClusterCharts(BaseModel):
    charts: dict[str, str] = Field(description="pie_chart, bar_chart and size_chart as data:image/png;base64 URIs")
    total_customers: int
    n_clusters: int


class ElbowChart(BaseModel):
    chart: str
    optimal_k: int


class TrainResult(BaseModel):
    message: str
    n_clusters: int
    silhouette_score: float | None
    inertia: float
    model_version: str
    n_samples: int
    duration_seconds: float
    cluster_sizes: dict[str, int]


class HistoryItem(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    customer_data: dict[str, Any]
    cluster: int
    cluster_name: str
    confidence: float
    model_version: str | None
    created_at: datetime


class HistoryPage(BaseModel):
    history: list[HistoryItem]
    total: int
    skip: int
    limit: int


class ModelVersionPublic(BaseModel):
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
    clusters: list[SegmentStats] = []
    k_selection: dict[str, Any] | None = None
    features: list[str] = []
    trained_at: str | None = None
    library_versions: dict[str, str] = {}


class ModelList(BaseModel):
    models: list[ModelVersionPublic]
    active_version: str | None


class AdminStats(BaseModel):
    total_users: int
    active_users: int
    inactive_users: int
    total_predictions: int
    total_profiles: int
    users_by_role: dict[str, int]
    predictions_by_cluster: dict[str, int]
    model: dict[str, Any] | None


class Health(BaseModel):
    status: Literal["healthy"] = "healthy"
    message: str = "Customer Segmentation API is running"
    version: str
    model_loaded: bool
    model_version: str | None
