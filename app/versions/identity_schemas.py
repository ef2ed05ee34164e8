"""Schemas of segment identity across versions: matching in train results, renames, comparisons."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

VERSION_EXAMPLE = "20250131-093000-a1b2c3"
PREVIOUS_VERSION_EXAMPLE = "20241231-093000-d4e5f6"

SegmentName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
SegmentDescription = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000)]


class SegmentMatch(BaseModel):
    """How one segment of a new version relates to the version that was active when it was trained."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"cluster_id": 2, "previous_cluster_id": 2, "shift": 0.031}]}
    )

    cluster_id: int
    previous_cluster_id: int | None = Field(description="The matched segment's id in the previous version; null if new")
    shift: float | None = Field(
        description="How far the centroid moved, in the new version's scaled units; null for a new segment"
    )


class SegmentRename(BaseModel):
    """PUT .../segments/{cluster_id}: either field may be left out; null restores the generated one."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"cluster_name": "Key accounts", "description": "Our best customers"}]},
    )

    cluster_name: SegmentName | None = Field(
        None, description="Unique within the model (trimmed, any case); null restores `generated_name`"
    )
    description: SegmentDescription | None = Field(None, description="null restores the generated description")


class ComparedSegment(BaseModel):
    cluster_id: int
    cluster_name: str
    segment_key: str
    size: int = Field(description="Customers of the file in this segment")
    percentage: float


class VersionComparison(BaseModel):
    """POST .../compare: where the customers of one file fall under two versions."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "from_version": PREVIOUS_VERSION_EXAMPLE,
                    "to_version": VERSION_EXAMPLE,
                    "n_customers": 1000,
                    "from_segments": [
                        {
                            "cluster_id": 0,
                            "cluster_name": "Key accounts",
                            "segment_key": "3fa2c1d9e0",
                            "size": 600,
                            "percentage": 60.0,
                        },
                        {
                            "cluster_id": 1,
                            "cluster_name": "Low income, low spending",
                            "segment_key": "77b0e41c2a",
                            "size": 400,
                            "percentage": 40.0,
                        },
                    ],
                    "to_segments": [
                        {
                            "cluster_id": 0,
                            "cluster_name": "Key accounts",
                            "segment_key": "3fa2c1d9e0",
                            "size": 590,
                            "percentage": 59.0,
                        },
                        {
                            "cluster_id": 1,
                            "cluster_name": "Low income, low spending",
                            "segment_key": "77b0e41c2a",
                            "size": 410,
                            "percentage": 41.0,
                        },
                    ],
                    "matrix": [[580, 20], [10, 390]],
                    "unchanged": 0.97,
                    "unchanged_segments": 0.97,
                }
            ]
        }
    )

    from_version: str
    to_version: str
    n_customers: int
    from_segments: list[ComparedSegment]
    to_segments: list[ComparedSegment]
    matrix: list[list[int]] = Field(
        description="matrix[i][j]: customers in segment i of from_version and j of to_version"
    )
    unchanged: float = Field(ge=0, le=1, description="The share of customers that kept their cluster_id")
    unchanged_segments: float = Field(
        ge=0,
        le=1,
        description="The share of customers that kept their segment_key: the figure that stays meaningful when k changes",
    )


class CompareQuery(BaseModel):
    model_config = ConfigDict(frozen=True)

    from_version: str = Field(max_length=64)
    to_version: str = Field(max_length=64)
