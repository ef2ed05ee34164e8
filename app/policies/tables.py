"""The `retraining_policies` and `policy_events` tables (app.policies)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.tables import Base, UTCDateTime, utcnow


class RetrainingPolicy(Base):
    """One segmentation's policy: what fires it (a cron `schedule`, the drift status reaching
    `on_drift`), the `gate` a candidate must pass, and what follows (`on_pass`, `then_run`).

    `since` is the moment its schedule counts from (set, or last fired) and `drift_fired_at` when
    drift last fired it: a worker claims a trigger by moving one of them with a compare-and-set
    UPDATE, so exactly one worker fires each trigger.
    """

    __tablename__ = "retraining_policies"

    segmentation_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("segmentations.id", ondelete="CASCADE"), primary_key=True
    )
    source: Mapped[str] = mapped_column(String(40))
    schedule: Mapped[str | None] = mapped_column(String(120))
    on_drift: Mapped[str | None] = mapped_column(String(16))
    gate: Mapped[dict] = mapped_column(JSON)
    on_pass: Mapped[str] = mapped_column(String(16))
    then_run: Mapped[bool] = mapped_column(Boolean)
    created_by: Mapped[str | None] = mapped_column(String(50))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    since: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    next_fire_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    drift_fired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_outcome: Mapped[str | None] = mapped_column(String(16))
    last_fired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class PolicyEvent(Base):
    """One trigger of a policy and how it ended: activated, held or failed, with its reasons and figures."""

    __tablename__ = "policy_events"
    __table_args__ = (Index("ix_policy_events_segmentation_at", "segmentation_id", "at", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    segmentation_id: Mapped[int] = mapped_column(Integer, ForeignKey("segmentations.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    trigger: Mapped[str] = mapped_column(String(16))
    model_version: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    reasons: Mapped[list] = mapped_column(JSON)
    figures: Mapped[dict | None] = mapped_column(JSON)
    job_id: Mapped[str | None] = mapped_column(String(32))
