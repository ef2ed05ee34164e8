"""One segmentation's model versions as the rest of the service sees them: `ModelStore`.

It puts together the version registry (SQL, app.versions.repository), the served version
(app.versions.serving) and the training coordinator (app.versions.training), and says which
segmentation they are of. Every worker keeps one store per live segmentation (app.segmentations.registry).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter

from app.core.config import Settings
from app.core.database import Database
from app.core.errors import Conflict
from app.core.events import EventSink
from app.core.tables import DEFAULT_SEGMENTATION, DEFAULT_SEGMENTATION_ID, DEFAULT_SEGMENTATION_KIND, Segmentation
from app.ml import ModelLoadError, SegmentationModel
from app.versions.activation import Actor
from app.versions.lease import TrainingLease
from app.versions.repository import ACTIVE_KEY, NAMES_KEY, VersionRepository
from app.versions.served import ServedModel
from app.versions.serving import ServingCache
from app.versions.training import TRAINING_KEY, TrainingCoordinator, TrainingReservation

if TYPE_CHECKING:
    from app.core.metrics import Metrics

logger = logging.getLogger("app.models")

NO_MODEL_MESSAGE = "No trained model yet: train one first with POST /train"


@dataclass(frozen=True)
class SegmentationInfo:
    """What a worker knows of a segmentation besides its versions (a row of `segmentations`)."""

    id: int
    name: str
    kind: str
    feature_schema: dict[str, Any] = field(default_factory=dict)
    description: str | None = None
    created_by: str | None = None
    created_at: datetime | None = None

    @property
    def is_default(self) -> bool:
        return self.id == DEFAULT_SEGMENTATION_ID

    @classmethod
    def from_row(cls, row: Segmentation) -> SegmentationInfo:
        return cls(
            id=row.id,
            name=row.name,
            kind=row.kind,
            feature_schema=dict(row.feature_schema or {}),
            description=row.description,
            created_by=row.created_by,
            created_at=row.created_at,
        )


DEFAULT_INFO = SegmentationInfo(id=DEFAULT_SEGMENTATION_ID, name=DEFAULT_SEGMENTATION, kind=DEFAULT_SEGMENTATION_KIND)


class ModelStore:
    """One segmentation's versions: list, load, activate, delete, train; and the one it serves."""

    def __init__(
        self,
        *,
        settings: Settings,
        database: Database,
        metrics: Metrics | None = None,
        segmentation: SegmentationInfo = DEFAULT_INFO,
        events: EventSink | None = None,
    ) -> None:
        self.settings = settings
        self.database = database
        self.segmentation = segmentation
        # Where activations are announced (model.activated); None: nowhere.
        self.events = events
        default = segmentation.is_default
        self.versions = VersionRepository(
            database, segmentation_id=segmentation.id, is_default=default, name=segmentation.name, events=events
        )
        self.serving = ServingCache(
            self.versions,
            name=segmentation.name,
            no_model_message=NO_MODEL_MESSAGE
            if default
            else f"No trained model yet in segmentation {segmentation.name}: train one first with "
            f"POST /segmentations/{segmentation.name}/train",
            settings=settings,
            local_copy=Path(settings.model_dir) if default else None,
        )
        self.lease = TrainingLease(database, TRAINING_KEY if default else f"{TRAINING_KEY}:{segmentation.id}")
        self.trainer = TrainingCoordinator(
            self.versions,
            self.serving,
            self.lease,
            name=segmentation.name,
            settings=settings,
            metrics=metrics,
        )
        # How this segmentation's `customer` body is checked, made on first use (its schema never changes).
        self.body_adapter: TypeAdapter[Any] | None = None

    @property
    def active_key(self) -> str:
        return self.versions.active_key

    @property
    def names_key(self) -> str:
        return self.versions.names_key

    @property
    def current(self) -> ServedModel | None:
        return self.serving.current

    @property
    def training(self) -> bool:
        return self.trainer.running

    def require(self) -> ServedModel:
        return self.serving.require()

    async def start(self, *, follow: bool = True) -> None:
        await self.serving.start(follow=follow)

    async def stop(self) -> None:
        await self.serving.stop()

    async def sync(self, **reading: Any) -> ServedModel | None:
        return await self.serving.sync(**reading)

    # --- versions --------------------------------------------------------------------------

    async def active_state(self) -> tuple[str | None, str | None]:
        return await self.versions.active_state()

    async def version_model(self, version: str) -> SegmentationModel:
        """The model of one of this segmentation's versions: the served one, else loaded (unknown: 404)."""
        current = self.current
        if current is not None and current.version == version:
            return current.model
        try:
            return await self.versions.load(version)
        except ModelLoadError as exc:
            raise Conflict(f"Model version {version} cannot be loaded: {exc}") from None

    async def list_versions(self) -> tuple[list[dict[str, Any]], str | None]:
        versions, active, _ = await self.versions.page()
        return versions, active

    async def page_versions(
        self, *, skip: int = 0, limit: int | None = None
    ) -> tuple[list[dict[str, Any]], str | None, int]:
        return await self.versions.page(skip=skip, limit=limit)

    async def get_version(self, version: str) -> dict[str, Any]:
        return await self.versions.detail(version)

    async def activate(self, version: str, *, by: Actor | None = None) -> ServedModel:
        """Make `version` the active one everywhere, after checking that it loads."""
        try:
            model = await self.versions.load(version)
        except ModelLoadError as exc:
            raise Conflict(f"Model version {version} cannot be loaded: {exc}") from None
        await self.versions.activate(version, by=by)
        served = await self.serving.sync(candidate=model)
        logger.info("activated model version %s of %s", version, self.segmentation.name)
        return served if served is not None else ServedModel(model)

    async def delete_version(self, version: str) -> None:
        await self.versions.delete(version)
        logger.info("deleted model version %s of %s", version, self.segmentation.name)

    # --- training --------------------------------------------------------------------------

    async def reserve_training(self) -> TrainingReservation:
        return await self.trainer.reserve()

    async def release_training(self, reservation: TrainingReservation) -> None:
        await self.trainer.release(reservation)

    async def train(
        self,
        data: Any,
        *,
        n_clusters: int | None,
        random_state: int,
        created_by: str | None,
        schema: dict[str, Any] | None = None,
    ) -> ServedModel:
        return await self.trainer.train(
            data, n_clusters=n_clusters, random_state=random_state, created_by=created_by, schema=schema
        )

    async def adopt(self, model: SegmentationModel, *, created_by: str | None) -> ServedModel:
        return await self.trainer.adopt(model, created_by=created_by)


__all__ = [
    "ACTIVE_KEY",
    "NAMES_KEY",
    "DEFAULT_INFO",
    "NO_MODEL_MESSAGE",
    "TRAINING_KEY",
    "ModelStore",
    "SegmentationInfo",
    "ServedModel",
    "TrainingReservation",
]
