"""Named segmentations: their table, and the segmentation of every version, history row and batch.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Everything a database held before is the `default` segmentation's: it is created with id 1,
and the existing model versions, history rows and batches are tied to it. The active version
of `default` stays where it was (service state `active_model_version`).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from app.core.tables import DEFAULT_SEGMENTATION, DEFAULT_SEGMENTATION_ID, utcnow

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_TIED = ("model_versions", "prediction_history", "batch_predictions")


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    if not inspector.has_table("segmentations"):
        op.create_table(
            "segmentations",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("name", sa.String(40), nullable=False),
            sa.Column("kind", sa.String(16), nullable=False),
            sa.Column("description", sa.Text(), nullable=True),
            sa.Column("feature_schema", sa.JSON(), nullable=False),
            sa.Column("created_by", sa.String(50), nullable=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
            sa.PrimaryKeyConstraint("id"),
        )
        op.create_index(
            "ux_segmentations_live_name",
            "segmentations",
            ["name"],
            unique=True,
            sqlite_where=sa.text("deleted_at IS NULL"),
            postgresql_where=sa.text("deleted_at IS NULL"),
        )
    for table in _TIED:
        if "segmentation_id" not in {c["name"] for c in inspector.get_columns(table)}:
            # A plain ADD COLUMN on both backends: the table (and its triggers) stay as they are.
            op.add_column(
                table,
                sa.Column(
                    "segmentation_id",
                    sa.Integer(),
                    nullable=False,
                    server_default=sa.text(str(DEFAULT_SEGMENTATION_ID)),
                ),
            )
    if "segmentation" not in {c["name"] for c in inspector.get_columns("prediction_history")}:
        op.add_column(
            "prediction_history",
            sa.Column("segmentation", sa.String(40), nullable=False, server_default=DEFAULT_SEGMENTATION),
        )
    indexes = {index["name"] for table in _TIED for index in inspector.get_indexes(table)}
    if "ix_prediction_history_user_segmentation" not in indexes:
        op.create_index(
            "ix_prediction_history_user_segmentation",
            "prediction_history",
            ["user_id", "segmentation_id", "created_at", "id"],
        )
    if "ix_model_versions_segmentation_created" not in indexes:
        op.create_index("ix_model_versions_segmentation_created", "model_versions", ["segmentation_id", "created_at"])
    segmentations = sa.table(
        "segmentations",
        sa.column("id", sa.Integer()),
        sa.column("name", sa.String()),
        sa.column("kind", sa.String()),
        sa.column("description", sa.Text()),
        sa.column("feature_schema", sa.JSON()),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    present = bind.execute(sa.select(segmentations.c.id).where(segmentations.c.id == DEFAULT_SEGMENTATION_ID)).first()
    if present is None:
        op.bulk_insert(
            segmentations,
            [
                {
                    "id": DEFAULT_SEGMENTATION_ID,
                    "name": DEFAULT_SEGMENTATION,
                    "kind": "customer",
                    "description": "The customer features of the seed dataset (age, income, spending, frequency)",
                    # A `customer` segmentation's schema is the customer features; nothing to store.
                    "feature_schema": {"kind": "customer"},
                    "created_at": utcnow(),
                }
            ],
        )
    if bind.dialect.name == "postgresql":  # the id sequence must start past the default's id
        op.execute("SELECT setval(pg_get_serial_sequence('segmentations', 'id'), (SELECT max(id) FROM segmentations))")


def downgrade() -> None:
    op.drop_index("ix_model_versions_segmentation_created", "model_versions")
    op.drop_index("ix_prediction_history_user_segmentation", "prediction_history")
    with op.batch_alter_table("prediction_history") as batch:
        batch.drop_column("segmentation")
    for table in _TIED:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("segmentation_id")
    op.drop_index("ux_segmentations_live_name", "segmentations")
    op.drop_table("segmentations")
