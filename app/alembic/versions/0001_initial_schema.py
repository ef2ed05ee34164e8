"""Initial schema: users, profiles, history, batches, tokens, login throttling, model versions, state.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Databases made before migrations existed (by `metadata.create_all`) already hold some or
all of these tables. This revision adopts them: a table that is there is kept with its
rows, provided it has every column below, and only what is missing is created.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _timestamp(name: str, **kwargs) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False, **kwargs)


def _tables() -> list[tuple[str, list, list[tuple[str, list[str], bool]]]]:
    """(table, columns and constraints, [(index, columns, unique)]) in dependency order."""
    return [
        ("users", [
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("email", sa.String(320), nullable=False),
            sa.Column("username", sa.String(50), nullable=False),
            sa.Column("full_name", sa.String(200), nullable=True),
            sa.Column("hashed_password", sa.String(255), nullable=False),
            sa.Column("role", sa.String(16), nullable=False),
            sa.Column("is_active", sa.Boolean(), nullable=False),
            sa.Column("token_version", sa.Integer(), nullable=False),
            _timestamp("created_at"),
            _timestamp("updated_at"),
            sa.PrimaryKeyConstraint("id"),
        ], [("ix_users_email", ["email"], True), ("ix_users_username", ["username"], True)]),
        ("customer_profiles", [
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("user_id", sa.Integer(), nullable=False),
            sa.Column("name", sa.String(200), nullable=False),
            sa.Column("sex", sa.String(10), nullable=False),
            sa.Column("age", sa.Integer(), nullable=False),
            sa.Column("annual_income", sa.Float(), nullable=False),
            sa.Column("spending_score", sa.Integer(), nullable=False),
            sa.Column("purchase_frequency", sa.Integer(), nullable=False),
            sa.Column("notes", sa.Text(), nullable=True),
            _timestamp("created_at"),
            _timestamp("updated_at"),
            sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
            sa.PrimaryKeyConstraint("id"),
        ], [("ix_customer_profiles_user_id", ["user_id"], False)]),
        ("prediction_history", [
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("user_id", sa.Integer(), nullable=False),
            sa.Column("customer_data", sa.JSON(), nullable=False),
            sa.Column("cluster", sa.Integer(), nullable=False),
            sa.Column("cluster_name", sa.String(200), nullable=False),
            sa.Column("confidence", sa.Float(), nullable=False),
            sa.Column("model_version", sa.String(64), nullable=True),
            _timestamp("created_at"),
            sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
            sa.PrimaryKeyConstraint("id"),
        ], [("ix_prediction_history_cluster", ["cluster"], False),
            ("ix_prediction_history_user_created", ["user_id", "created_at", "id"], False)]),
        ("batch_predictions", [
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("user_id", sa.Integer(), nullable=True),
            sa.Column("model_version", sa.String(64), nullable=True),
            sa.Column("n_rows", sa.Integer(), nullable=False),
            sa.Column("n_failed", sa.Integer(), nullable=False),
            sa.Column("cluster_counts", sa.JSON(), nullable=False),
            _timestamp("created_at"),
            sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="SET NULL"),
            sa.PrimaryKeyConstraint("id"),
        ], [("ix_batch_predictions_user_id", ["user_id"], False)]),
        ("revoked_tokens", [
            sa.Column("jti", sa.String(64), nullable=False),
            sa.Column("user_id", sa.Integer(), nullable=True),
            _timestamp("expires_at"),
            _timestamp("revoked_at"),
            sa.PrimaryKeyConstraint("jti"),
        ], [("ix_revoked_tokens_expires_at", ["expires_at"], False),
            ("ix_revoked_tokens_user_id", ["user_id"], False)]),
        ("login_failures", [
            sa.Column("key", sa.String(400), nullable=False),
            _timestamp("window_start"),
            sa.Column("failures", sa.Integer(), nullable=False),
            sa.PrimaryKeyConstraint("key"),
        ], []),
        ("model_versions", [
            sa.Column("version", sa.String(64), nullable=False),
            _timestamp("created_at"),
            sa.Column("created_by", sa.String(50), nullable=True),
            sa.Column("n_clusters", sa.Integer(), nullable=False),
            sa.Column("silhouette_score", sa.Float(), nullable=True),
            sa.Column("inertia", sa.Float(), nullable=False),
            sa.Column("n_samples", sa.BigInteger(), nullable=False),
            sa.Column("data_fingerprint", sa.String(128), nullable=True),
            sa.Column("details", sa.JSON(), nullable=False),
            sa.Column("artifact", sa.LargeBinary(), nullable=False),
            sa.PrimaryKeyConstraint("version"),
        ], [("ix_model_versions_created_at", ["created_at"], False)]),
        ("service_state", [
            sa.Column("key", sa.String(64), nullable=False),
            sa.Column("value", sa.String(200), nullable=True),
            _timestamp("updated_at"),
            sa.PrimaryKeyConstraint("key"),
        ], []),
    ]


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for table, elements, indexes in _tables():
        if inspector.has_table(table):
            present = {c["name"] for c in inspector.get_columns(table)}
            missing = [e.name for e in elements if isinstance(e, sa.Column) and e.name not in present]
            if missing:
                raise RuntimeError(
                    f"Cannot adopt the existing table {table!r}: it lacks the columns {', '.join(missing)}. "
                    "Back the database up and migrate it by hand."
                )
            existing_indexes = {i["name"] for i in inspector.get_indexes(table)}
        else:
            op.create_table(table, *elements)
            existing_indexes = set()
        for name, columns, unique in indexes:
            if name not in existing_indexes:
                op.create_index(name, table, columns, unique=unique)


def downgrade() -> None:
    for table, _, indexes in reversed(_tables()):
        for name, _, _ in indexes:
            op.drop_index(name, table_name=table)
        op.drop_table(table)
