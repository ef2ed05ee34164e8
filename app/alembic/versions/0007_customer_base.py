"""Customer base: scoring runs, the base each run leaves, staging and changes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

CUSTOMER_ID = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")
TABLES = ("customer_changes", "customer_memberships", "customer_staging", "customer_runs")


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("customer_runs"):
        return  # made by create_all before this revision ran
    op.create_table(
        "customer_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("segmentation_id", sa.Integer(), nullable=False),
        sa.Column("segmentation", sa.String(40), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("previous_run_id", sa.Integer(), nullable=True),
        sa.Column("n_customers", sa.Integer(), nullable=True),
        sa.Column("n_new", sa.Integer(), nullable=True),
        sa.Column("n_changed", sa.Integer(), nullable=True),
        sa.Column("n_unchanged", sa.Integer(), nullable=True),
        sa.Column("n_gone", sa.Integer(), nullable=True),
        sa.Column("entered", sa.JSON(), nullable=True),
        sa.Column("left", sa.JSON(), nullable=True),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(50), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("error_status", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_customer_runs_segmentation_status", "customer_runs", ["segmentation_id", "status", "id"])
    op.create_index(
        "ux_customer_runs_running",
        "customer_runs",
        ["segmentation_id"],
        unique=True,
        sqlite_where=sa.text("status = 'running'"),
        postgresql_where=sa.text("status = 'running'"),
    )
    op.create_table(
        "customer_staging",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("customer_id", CUSTOMER_ID, nullable=False),
        sa.Column("segment_key", sa.String(64), nullable=False),
        sa.Column("cluster_id", sa.Integer(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("p_alive", sa.Float(), nullable=True),
        sa.Column("clv", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", "customer_id"),
        sqlite_with_rowid=False,
    )
    if op.get_bind().dialect.name == "postgresql":
        # Staging is rewritten by every run and worthless after a crash: no WAL for it.
        op.execute("ALTER TABLE customer_staging SET UNLOGGED")
    op.create_table(
        "customer_memberships",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("customer_id", CUSTOMER_ID, nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("segment_key", sa.String(64), nullable=True),
        sa.Column("cluster_id", sa.Integer(), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("since_run_id", sa.Integer(), nullable=False),
        sa.Column("p_alive", sa.Float(), nullable=True),
        sa.Column("clv", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", "customer_id"),
        sqlite_with_rowid=False,
    )
    op.create_index(
        "ix_customer_memberships_audience", "customer_memberships", ["run_id", "segment_key", "customer_id"]
    )
    op.create_table(
        "customer_changes",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("customer_id", CUSTOMER_ID, nullable=False),
        sa.Column("change", sa.String(8), nullable=False),
        sa.Column("from_segment_key", sa.String(64), nullable=True),
        sa.Column("to_segment_key", sa.String(64), nullable=True),
        sa.Column("from_cluster_id", sa.Integer(), nullable=True),
        sa.Column("to_cluster_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", "customer_id"),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_index("ix_customer_memberships_audience", table_name="customer_memberships")
    op.drop_index("ux_customer_runs_running", table_name="customer_runs")
    op.drop_index("ix_customer_runs_segmentation_status", table_name="customer_runs")
    for name in TABLES:
        op.drop_table(name)
