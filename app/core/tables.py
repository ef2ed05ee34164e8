"""The ORM tables (and the triggers that keep history counts), shared by every repository."""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    event,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Role(enum.StrEnum):
    user = "user"
    analyst = "analyst"
    admin = "admin"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True, index=True)
    username: Mapped[str] = mapped_column(String(50), unique=True, index=True)
    full_name: Mapped[str | None] = mapped_column(String(200))
    hashed_password: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default=Role.user.value)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Bumped on password change: every token carrying an older value is rejected.
    token_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class CustomerProfile(Base):
    __tablename__ = "customer_profiles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    sex: Mapped[str] = mapped_column(String(10))
    age: Mapped[int] = mapped_column(Integer)
    annual_income: Mapped[float] = mapped_column(Float)
    spending_score: Mapped[int] = mapped_column(Integer)
    purchase_frequency: Mapped[int] = mapped_column(Integer)
    notes: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


DEFAULT_SEGMENTATION_ID = 1


DEFAULT_SEGMENTATION = "default"


DEFAULT_SEGMENTATION_KIND = "customer"
"""The kind of `default`, and of every model saved before segmentations had kinds."""


class Segmentation(Base):
    """A named line of model versions over one feature schema; `default` (id 1) always exists.

    A deleted segmentation keeps its row (with `deleted_at` set) so the history rows tied to it
    still say what they belonged to; its name is free again, and a new segmentation of that
    name gets a new id, so it never inherits them.
    """

    __tablename__ = "segmentations"
    __table_args__ = (
        Index(
            "ux_segmentations_live_name",
            "name",
            unique=True,
            sqlite_where=text("deleted_at IS NULL"),
            postgresql_where=text("deleted_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(Text)
    # The declared feature schema (app.ml.schema.FeatureSchema.to_dict()).
    feature_schema: Mapped[dict] = mapped_column(JSON)
    created_by: Mapped[str | None] = mapped_column(String(50))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class PredictionHistory(Base):
    __tablename__ = "prediction_history"
    __table_args__ = (
        Index("ix_prediction_history_user_created", "user_id", "created_at", "id"),
        Index("ix_prediction_history_user_segmentation", "user_id", "segmentation_id", "created_at", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    customer_data: Mapped[dict] = mapped_column(JSON)
    cluster: Mapped[int] = mapped_column(Integer, index=True)
    cluster_name: Mapped[str] = mapped_column(String(200))
    confidence: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The segmentation the prediction was made with; its name is kept beside it, as it was then.
    segmentation_id: Mapped[int] = mapped_column(
        Integer, default=DEFAULT_SEGMENTATION_ID, server_default=text(str(DEFAULT_SEGMENTATION_ID))
    )
    segmentation: Mapped[str] = mapped_column(
        String(40), default=DEFAULT_SEGMENTATION, server_default=DEFAULT_SEGMENTATION
    )


# The table itself, typed as one (an ORM class's `__table__` is typed as any FromClause).


PREDICTION_HISTORY: Table = PredictionHistory.__table__  # type: ignore[assignment]


class HistoryCount(Base):
    """How many history rows a user has: a history page's total without counting the rows.

    Kept by triggers on prediction_history (`history_count_triggers`), in the transaction
    of each insert and delete, whichever code path or process makes it.
    """

    __tablename__ = "history_counts"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    total: Mapped[int] = mapped_column(Integer)


# SQLite runs a trigger per row; PostgreSQL once per statement over its transition table, so
# a batch of 500 rows touches each user's count once (in user order: two batches that hold
# the same users take their row locks in the same order and cannot deadlock).


_HISTORY_COUNT_TRIGGERS = {
    "sqlite": [
        """CREATE TRIGGER prediction_history_count_insert AFTER INSERT ON prediction_history
        BEGIN
            INSERT INTO history_counts (user_id, total) VALUES (NEW.user_id, 1)
            ON CONFLICT (user_id) DO UPDATE SET total = total + 1;
        END""",
        """CREATE TRIGGER prediction_history_count_delete AFTER DELETE ON prediction_history
        BEGIN
            UPDATE history_counts SET total = total - 1 WHERE user_id = OLD.user_id;
        END""",
    ],
    "postgresql": [
        """CREATE OR REPLACE FUNCTION prediction_history_count_insert() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO history_counts AS kept (user_id, total)
            SELECT user_id, count(*) FROM inserted_rows GROUP BY user_id ORDER BY user_id
            ON CONFLICT (user_id) DO UPDATE SET total = kept.total + EXCLUDED.total;
            RETURN NULL;
        END $$""",
        """CREATE TRIGGER prediction_history_count_insert AFTER INSERT ON prediction_history
        REFERENCING NEW TABLE AS inserted_rows
        FOR EACH STATEMENT EXECUTE FUNCTION prediction_history_count_insert()""",
        """CREATE OR REPLACE FUNCTION prediction_history_count_delete() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE history_counts AS kept SET total = kept.total - gone.n
            FROM (SELECT user_id, count(*) AS n FROM deleted_rows GROUP BY user_id ORDER BY user_id) AS gone
            WHERE kept.user_id = gone.user_id;
            RETURN NULL;
        END $$""",
        """CREATE TRIGGER prediction_history_count_delete AFTER DELETE ON prediction_history
        REFERENCING OLD TABLE AS deleted_rows
        FOR EACH STATEMENT EXECUTE FUNCTION prediction_history_count_delete()""",
    ],
}


_HISTORY_COUNT_TRIGGER_NAMES = ("prediction_history_count_insert", "prediction_history_count_delete")


def drop_history_count_triggers(dialect: str, *, functions: bool = False) -> list[str]:
    """Statements that drop the triggers keeping history_counts (and on PostgreSQL, their functions)."""
    drops = []
    for name in _HISTORY_COUNT_TRIGGER_NAMES:
        if dialect == "postgresql":
            drops.append(f"DROP TRIGGER IF EXISTS {name} ON prediction_history")
            if functions:
                drops.append(f"DROP FUNCTION IF EXISTS {name}()")
        else:
            drops.append(f"DROP TRIGGER IF EXISTS {name}")
    return drops


def history_count_triggers(dialect: str) -> list[str]:
    """Statements that (re)create the triggers keeping history_counts; dropping old ones first."""
    return drop_history_count_triggers(dialect) + _HISTORY_COUNT_TRIGGERS[dialect]


RECOUNT_HISTORY = [
    "DELETE FROM history_counts",
    "INSERT INTO history_counts (user_id, total) SELECT user_id, count(*) FROM prediction_history GROUP BY user_id",
]


@event.listens_for(Base.metadata, "after_create")
def _create_history_count_triggers(_metadata, connection, **_kw) -> None:
    # The migrations create them too (revision 0002); this covers `metadata.create_all`.
    for statement in history_count_triggers(connection.dialect.name):
        connection.exec_driver_sql(statement)


class BatchPrediction(Base):
    """One batch scoring request: counted in statistics, not listed as history."""

    __tablename__ = "batch_predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    model_version: Mapped[str | None] = mapped_column(String(64))
    segmentation_id: Mapped[int] = mapped_column(
        Integer, default=DEFAULT_SEGMENTATION_ID, server_default=text(str(DEFAULT_SEGMENTATION_ID))
    )
    n_rows: Mapped[int] = mapped_column(Integer)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    # {"<cluster id>": count}
    cluster_counts: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RevokedToken(Base):
    __tablename__ = "revoked_tokens"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int | None] = mapped_column(Integer, index=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    revoked_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LoginFailure(Base):
    """Failed logins per key (`user:<name>` or `ip:<address>`) in the current window."""

    __tablename__ = "login_failures"

    key: Mapped[str] = mapped_column(String(400), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(UTCDateTime)
    failures: Mapped[int] = mapped_column(Integer, default=0)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (Index("ix_model_versions_segmentation_created", "segmentation_id", "created_at"),)

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    segmentation_id: Mapped[int] = mapped_column(
        Integer, default=DEFAULT_SEGMENTATION_ID, server_default=text(str(DEFAULT_SEGMENTATION_ID))
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    created_by: Mapped[str | None] = mapped_column(String(50))
    n_clusters: Mapped[int] = mapped_column(Integer)
    silhouette_score: Mapped[float | None] = mapped_column(Float)
    inertia: Mapped[float] = mapped_column(Float)
    n_samples: Mapped[int] = mapped_column(BigInteger)
    data_fingerprint: Mapped[str | None] = mapped_column(String(128))
    details: Mapped[dict] = mapped_column(JSON)
    artifact: Mapped[bytes] = mapped_column(LargeBinary)


class DriftCount(Base):
    """What one worker process counted for one model version within one time bucket (app.versions.drift).

    `counts` is the flat bin vector of app.ml.drift (every feature's bins, then one per cluster),
    `sums` each feature's sum of observed values. A process rewrites its own row of the current
    bucket at each flush, so rows grow with buckets and processes, not with requests.
    """

    __tablename__ = "drift_counts"
    __table_args__ = (
        Index("ix_drift_counts_version_bucket", "model_version", "bucket_start"),
        Index("ux_drift_counts_writer", "model_version", "bucket_start", "writer", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    segmentation_id: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[str] = mapped_column(String(64))
    bucket_start: Mapped[datetime] = mapped_column(UTCDateTime)
    writer: Mapped[str] = mapped_column(String(160))
    n_rows: Mapped[int] = mapped_column(BigInteger)
    counts: Mapped[list] = mapped_column(JSON)
    sums: Mapped[list] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class ServiceState(Base):
    """Small shared key/value facts every worker reads, e.g. the active model version."""

    __tablename__ = "service_state"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str | None] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class TrainingJob(Base):
    """A training started with `wait=false`: its state, progress and outcome (app.jobs.service).

    `worker` names the process running it (`<host>:<pid>`), `heartbeat_at` when it last said it
    was alive: a job whose worker is gone is marked failed, never left running.
    """

    __tablename__ = "training_jobs"
    __table_args__ = (
        Index("ix_training_jobs_created", "created_at", "id"),
        Index("ix_training_jobs_state", "state"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    segmentation_id: Mapped[int] = mapped_column(Integer, index=True)
    # The segmentation's name as it was when the job started.
    segmentation: Mapped[str] = mapped_column(String(40))
    state: Mapped[str] = mapped_column(String(16))
    phase: Mapped[str] = mapped_column(String(32))
    # 0..1 within the current phase, when it can be told (bytes read of the upload); else null.
    fraction: Mapped[float | None] = mapped_column(Float)
    # [{"phase", "at"}]: when each phase began.
    phases: Mapped[list] = mapped_column(JSON)
    # The request's query values and upload: {"n_clusters", "random_state", "as_of", "file", "bytes"}.
    parameters: Mapped[dict] = mapped_column(JSON)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str | None] = mapped_column(String(50))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The train result body (succeeded), or the error body with its HTTP status (failed, cancelled).
    result: Mapped[dict | None] = mapped_column(JSON)
    error: Mapped[dict | None] = mapped_column(JSON)
    error_status: Mapped[int | None] = mapped_column(Integer)
