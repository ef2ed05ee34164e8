"""Retraining policies and their events.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("retraining_policies"):
        return  # made by create_all before this revision ran
    op.create_table(
        "retraining_policies",
        sa.Column("segmentation_id", sa.Integer(), sa.ForeignKey("segmentations.id", ondelete="CASCADE"), nullable=False),
        sa.Column("source", sa.String(40), nullable=False),
        sa.Column("schedule", sa.String(120), nullable=True),
        sa.Column("on_drift", sa.String(16), nullable=True),
        sa.Column("gate", sa.JSON(), nullable=False),
        sa.Column("on_pass", sa.String(16), nullable=False),
        sa.Column("then_run", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(50), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_fire_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("drift_fired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_outcome", sa.String(16), nullable=True),
        sa.Column("last_fired_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("segmentation_id"),
    )
    op.create_table(
        "policy_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("segmentation_id", sa.Integer(), sa.ForeignKey("segmentations.id", ondelete="CASCADE"), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("figures", sa.JSON(), nullable=True),
        sa.Column("job_id", sa.String(32), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_policy_events_segmentation_at", "policy_events", ["segmentation_id", "at", "id"])


def downgrade() -> None:
    op.drop_table("policy_events")
    op.drop_table("retraining_policies")
