"""Model versions as the API shows them: listings, details, and each version's segments."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from app.core.schemas import VERSION_EXAMPLE
from app.versions.identity_schemas import SegmentMatch

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


class VersionLineage(BaseModel):
    """Which version a new one continues, and how its segments matched: in a train result and a version's details."""

    previous_version: str | None = Field(
        None, description="The version this one was matched to (the active one when it was trained); null if none"
    )
    matching: list[SegmentMatch] = []
    retired_cluster_ids: list[int] = Field(
        [], description="Ids of the previous version's segments that no segment of this version continues"
    )


class BgNbdFit(BaseModel):
    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float
    n_customers: int


class GammaGammaFit(BaseModel):
    p: float
    q: float
    gamma: float
    log_likelihood: float
    n_customers: int = Field(description="The repeat customers with a positive mean spend it was fitted on")


class ValueModelFit(BaseModel):
    """An rfm version's value models (the contract's "Predicted value"); either may be null on its own."""

    bgnbd: BgNbdFit | None
    gamma_gamma: GammaGammaFit | None


class VersionDetail(ModelVersionPublic, VersionLineage):
    """What a version's details show of every kind, besides its segments."""

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
    value_model: ValueModelFit | None = Field(
        None,
        description="Kind rfm: the BG/NBD and Gamma-Gamma parameters fitted at training (null: none; see warnings)",
    )
    warnings: list[str] = Field(
        default_factory=list, description="What training could not do (kind rfm: a value model)"
    )


class ModelVersionDetail(VersionDetail):
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


class ModelList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"models": [MODEL_VERSION_EXAMPLE], "active_version": VERSION_EXAMPLE}]}
    )

    models: list[ModelVersionPublic]
    active_version: str | None


class NamedModelVersionDetail(VersionDetail):
    clusters: list[dict[str, Any]] = []
    missing_shares: dict[str, float] = {}


class ModelPageQuery(BaseModel):
    model_config = ConfigDict(frozen=True)

    skip: int = Field(0, ge=0, le=2**31 - 1)
    limit: int = Field(50, ge=1, le=200)


class ModelPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "models": [MODEL_VERSION_EXAMPLE],
                    "active_version": VERSION_EXAMPLE,
                    "total": 1,
                    "skip": 0,
                    "limit": 50,
                }
            ]
        }
    )

    models: list[ModelVersionPublic]
    active_version: str | None
    total: int
    skip: int
    limit: int


NAMED_SEGMENT_EXAMPLE: dict[str, JsonValue] = {
    **SEGMENT_EXAMPLE,
    "means": {"age": 37.2, "annual_income": 118.4, "spending_score": 80.1, "purchase_frequency": 41.3},
    "segment_key": "s-3fa2c1",
    "generated_name": "High income, high spending",
}


class NamedSegmentStats(BaseModel):
    """A segment of any kind; kind `customer` also carries its `avg_*` fields."""

    model_config = ConfigDict(json_schema_extra={"examples": [NAMED_SEGMENT_EXAMPLE]})

    cluster_id: int
    cluster_name: str
    size: int
    percentage: float
    description: str
    means: dict[str, float | dict[str, float]] = Field(
        description="Each feature's mean in its own units (categorical: the share of each level)"
    )
    segment_key: str
    generated_name: str
    avg_age: float | None = None
    avg_income: float | None = None
    avg_spending_score: float | None = None
    avg_purchase_frequency: float | None = None
    revenue_share: float | None = Field(
        None, description="Kind rfm: the segment's share of the training customers' revenue, 0..100"
    )
    mean_p_alive: float | None = Field(
        None, description="Kind rfm: the mean P(alive) of the segment's training customers (BG/NBD)"
    )
    predicted_revenue_share: float | None = Field(
        None, description="Kind rfm: the segment's share, 0..100, of the training customers' summed clv at 90 days"
    )
