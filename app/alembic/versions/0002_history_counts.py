"""Per-user history counts, kept by triggers: a history page's total without counting the rows.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

The triggers are created before the counts are taken, in the same transaction: on
PostgreSQL creating them locks prediction_history against inserts until the commit, so no
row written meanwhile can be missed or counted twice (SQLite's migration lock holds every
writer off already).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from app.core.tables import RECOUNT_HISTORY, drop_history_count_triggers, history_count_triggers

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if not sa.inspect(bind).has_table("history_counts"):  # `create_all` databases may have it already
        op.create_table(
            "history_counts",
            sa.Column("user_id", sa.Integer(), autoincrement=False, nullable=False),
            sa.Column("total", sa.Integer(), nullable=False),
            sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
            sa.PrimaryKeyConstraint("user_id"),
        )
    for statement in history_count_triggers(bind.dialect.name) + RECOUNT_HISTORY:
        op.execute(statement)


def downgrade() -> None:
    for statement in drop_history_count_triggers(op.get_bind().dialect.name, functions=True):
        op.execute(statement)
    op.drop_table("history_counts")
