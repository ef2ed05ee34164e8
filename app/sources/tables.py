"""The `data_sources` table: one row per named source, its password sealed (app.sources.crypto)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.core.tables import Base, UTCDateTime, utcnow


class DataSource(Base):
    """A named place to read customers or transactions from.

    `kind` is `file` (`path`: a file or a glob relative to SOURCE_ROOT) or `sql` (`url` without its
    password, `password_sealed` the password encrypted under SECRET_KEY, `query` one SELECT).
    """

    __tablename__ = "data_sources"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(40), unique=True)
    kind: Mapped[str] = mapped_column(String(8))
    path: Mapped[str | None] = mapped_column(String(500))
    url: Mapped[str | None] = mapped_column(String(2000))
    password_sealed: Mapped[str | None] = mapped_column(Text)
    query: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(50))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
