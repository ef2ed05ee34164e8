"""Drift counts: what each worker scored per model version and time bucket, for GET .../drift.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08

A new table only; versions trained before it have no drift reference in their details, and
their drift answers 409 until a new version is trained.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("drift_counts"):  # `create_all` databases may have it already
        return
    op.create_table(
        "drift_counts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("segmentation_id", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("bucket_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("writer", sa.String(160), nullable=False),
        sa.Column("n_rows", sa.BigInteger(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("sums", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_drift_counts_version_bucket", "drift_counts", ["model_version", "bucket_start"])
    op.create_index(
        "ux_drift_counts_writer", "drift_counts", ["model_version", "bucket_start", "writer"], unique=True
    )


def downgrade() -> None:
    op.drop_index("ux_drift_counts_writer", "drift_counts")
    op.drop_index("ix_drift_counts_version_bucket", "drift_counts")
    op.drop_table("drift_counts")
