"""The segmentation kinds this service offers: one line each."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, WithJsonSchema

from app.core.errors import InvalidInput
from app.core.tables import DEFAULT_SEGMENTATION_KIND
from app.segmentations.kinds.base import Kind
from app.segmentations.kinds.custom import CustomKind
from app.segmentations.kinds.customer import CustomerKind
from app.segmentations.kinds.rfm import RfmKind

if TYPE_CHECKING:
    from app.ml.schema import FeatureSchema
    from app.versions.store import SegmentationInfo

KINDS: dict[str, Kind] = {kind.name: kind for kind in (CustomerKind(), CustomKind(), RfmKind())}
DEFAULT_KIND = DEFAULT_SEGMENTATION_KIND


def _offered(name: str) -> str:
    if name not in KINDS:
        raise ValueError(f"Input should be {', '.join(repr(k) for k in KINDS)}")
    return name


KindName = Annotated[
    str, AfterValidator(_offered), WithJsonSchema({"type": "string", "enum": list(KINDS), "title": "Kind"})
]
"""A kind's name in a request body, documented as the list of kinds offered."""


def get_kind(name: str) -> Kind:
    """The kind named `name` (422 for one this service does not offer)."""
    kind = KINDS.get(name)
    if kind is None:
        raise InvalidInput(f"kind must be one of {', '.join(KINDS)}, not {name!r}")
    return kind


def kind_of(info: SegmentationInfo) -> Kind:
    return KINDS[info.kind]


def feature_schema(info: SegmentationInfo) -> FeatureSchema:
    """The clustering features of a segmentation, whatever its kind."""
    return kind_of(info).schema(info)
