"""The customer base's tables: runs, the base each completed run leaves, staging, and the changes.

The base is kept as one snapshot per run (`customer_memberships`, keyed by run and customer): a
run writes its snapshot beside the current one and lands by marking itself completed, one small
update. The current base of a segmentation is the snapshot of its latest completed run, so a run
that dies half-way leaves nothing a reader sees. Customer ids are compared byte by byte: SQLite's
default BINARY collation does that, PostgreSQL's "C" collation too.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Float, Index, Integer, PrimaryKeyConstraint, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from app.core.tables import Base, UTCDateTime, utcnow

CUSTOMER_ID = Text().with_variant(Text(collation="C"), "postgresql")
"""A customer id: text, ordered by its bytes on both databases."""

RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
ACTIVE = "active"
GONE = "gone"


class CustomerRun(Base):
    """One scoring run of a segmentation; `status` running, completed or failed.

    A running run names its `worker` and beats `heartbeat_at`; one whose worker is gone is marked
    failed. At most one run of a segmentation is running (a partial unique index).
    """

    __tablename__ = "customer_runs"
    __table_args__ = (
        Index("ix_customer_runs_segmentation_status", "segmentation_id", "status", "id"),
        Index(
            "ux_customer_runs_running",
            "segmentation_id",
            unique=True,
            sqlite_where=text("status = 'running'"),
            postgresql_where=text("status = 'running'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    segmentation_id: Mapped[int] = mapped_column(Integer)
    # The segmentation's name as it was when the run started.
    segmentation: Mapped[str] = mapped_column(String(40))
    model_version: Mapped[str] = mapped_column(String(64))
    mode: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    previous_run_id: Mapped[int | None] = mapped_column(Integer)
    n_customers: Mapped[int | None] = mapped_column(Integer)
    n_new: Mapped[int | None] = mapped_column(Integer)
    n_changed: Mapped[int | None] = mapped_column(Integer)
    n_unchanged: Mapped[int | None] = mapped_column(Integer)
    n_gone: Mapped[int | None] = mapped_column(Integer)
    # {segment_key: customers} that entered / left each segment in this run.
    entered: Mapped[dict | None] = mapped_column(JSON)
    left: Mapped[dict | None] = mapped_column(JSON)
    # The request's `as_of`, the upload's name and size.
    parameters: Mapped[dict] = mapped_column(JSON)
    created_by: Mapped[str | None] = mapped_column(String(50))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A failed run: the error body the request would have answered, and its status.
    error: Mapped[dict | None] = mapped_column(JSON)
    error_status: Mapped[int | None] = mapped_column(Integer)


class CustomerStaging(Base):
    """What a run scored, before it is compared with the current base (removed as it is merged)."""

    __tablename__ = "customer_staging"
    __table_args__ = (PrimaryKeyConstraint("run_id", "customer_id"), {"sqlite_with_rowid": False})

    run_id: Mapped[int] = mapped_column(Integer)
    customer_id: Mapped[str] = mapped_column(CUSTOMER_ID)
    segment_key: Mapped[str] = mapped_column(String(64))
    cluster_id: Mapped[int] = mapped_column(Integer)
    confidence: Mapped[float] = mapped_column(Float)
    p_alive: Mapped[float | None] = mapped_column(Float)
    clv: Mapped[float | None] = mapped_column(Float)


class CustomerMembership(Base):
    """A customer's membership in the base a run leaves: its segment, or `gone` with none."""

    __tablename__ = "customer_memberships"
    __table_args__ = (
        PrimaryKeyConstraint("run_id", "customer_id"),
        Index("ix_customer_memberships_audience", "run_id", "segment_key", "customer_id"),
        {"sqlite_with_rowid": False},
    )

    run_id: Mapped[int] = mapped_column(Integer)
    customer_id: Mapped[str] = mapped_column(CUSTOMER_ID)
    status: Mapped[str] = mapped_column(String(8))
    segment_key: Mapped[str | None] = mapped_column(String(64))
    cluster_id: Mapped[int | None] = mapped_column(Integer)
    confidence: Mapped[float | None] = mapped_column(Float)
    model_version: Mapped[str | None] = mapped_column(String(64))
    since_run_id: Mapped[int] = mapped_column(Integer)
    # Kind rfm: P(alive) and the value predicted over 90 days.
    p_alive: Mapped[float | None] = mapped_column(Float)
    clv: Mapped[float | None] = mapped_column(Float)


class CustomerChange(Base):
    """A customer that a run made new, moved to another segment, or found gone."""

    __tablename__ = "customer_changes"
    __table_args__ = (PrimaryKeyConstraint("run_id", "customer_id"), {"sqlite_with_rowid": False})

    run_id: Mapped[int] = mapped_column(Integer)
    customer_id: Mapped[str] = mapped_column(CUSTOMER_ID)
    change: Mapped[str] = mapped_column(String(8))
    from_segment_key: Mapped[str | None] = mapped_column(String(64))
    to_segment_key: Mapped[str | None] = mapped_column(String(64))
    from_cluster_id: Mapped[int | None] = mapped_column(Integer)
    to_cluster_id: Mapped[int | None] = mapped_column(Integer)
