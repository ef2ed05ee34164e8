"""The RFM kind's column mapping, constants, clustering schema and what reading a log gives."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

import pandas as pd

from app.ml.schema import Feature, FeatureSchema, SchemaError

RFM_FEATURES = ("recency_days", "frequency", "monetary")
"""What K-Means clusters on: recency_days as it is, log1p(frequency), log1p(max(monetary, 0))."""
TABLE_COLUMNS = ("customer_id", "recency_days", "frequency", "monetary", "tenure_days", "avg_order_value")
SCORE_COLUMNS = ("r_score", "f_score", "m_score", "rfm_segment")
QUANTILES = (0.2, 0.4, 0.6, 0.8)
MAX_TRANSACTIONS = 10_000
"""Transactions one POST .../predict may carry."""
BLOCK_BYTES = 8 << 20
"""Bytes of CSV parsed at a time: a few hundred thousand rows."""
PARQUET_BATCH_ROWS = 250_000
EPOCH = date(1970, 1, 1)
_LOG_KEYS = ("customer_id", "date", "amount", "order_id", "quantity", "price", "date_format")

# r_score (rows, 1..5) x f_score (columns, 1..5) -> the classic segment names.
SEGMENT_GRID: tuple[tuple[str, ...], ...] = (
    ("Hibernating", "Hibernating", "At risk", "At risk", "Cannot lose them"),
    ("Hibernating", "Hibernating", "At risk", "At risk", "Cannot lose them"),
    ("About to sleep", "About to sleep", "Need attention", "Loyal customers", "Loyal customers"),
    ("Promising", "Potential loyalists", "Potential loyalists", "Loyal customers", "Loyal customers"),
    ("New customers", "Potential loyalists", "Potential loyalists", "Champions", "Champions"),
)


# --------------------------------------------------------------------------- #
# The column mapping


@dataclass(frozen=True)
class LogColumns:
    """Which header of a transaction log holds what (matched trimmed and case-insensitively).

    ``amount`` is the line's value; a log without it maps ``quantity`` and
    ``price`` (amount = quantity x price). ``order_id`` is optional, and so
    is ``date_format`` (a strftime pattern; without it dates are ISO 8601,
    with or without a time, or ``YYYYMMDD``).
    """

    customer_id: str = "customer_id"
    date: str = "date"
    amount: str | None = "amount"
    order_id: str | None = None
    quantity: str | None = None
    price: str | None = None
    date_format: str | None = None

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> LogColumns:
        """The mapping a segmentation declares (None: the defaults); raises SchemaError."""
        if mapping is None:
            return cls()
        if not isinstance(mapping, Mapping):
            raise SchemaError("columns must be an object mapping customer_id, date, amount, ... to headers")
        unknown = sorted(str(k) for k in mapping if k not in _LOG_KEYS)
        if unknown:
            raise SchemaError(f"columns: unknown key(s) {', '.join(unknown)}; known: {', '.join(_LOG_KEYS)}")
        values: dict[str, str | None] = {}
        for key, raw in mapping.items():
            if raw is None:
                values[key] = None
                continue
            if not isinstance(raw, str) or not raw.strip() or len(raw.strip()) > 64:
                raise SchemaError(f"columns.{key} must be a header of 1 to 64 characters")
            values[key] = raw if key == "date_format" else raw.strip()
        if values.get("customer_id", "") is None or values.get("date", "") is None:
            raise SchemaError("columns.customer_id and columns.date cannot be null")
        priced = [values.get("quantity"), values.get("price")]
        if any(priced) and not all(priced):
            raise SchemaError("columns: map both quantity and price (amount = quantity x price), or neither")
        if all(priced):
            if values.get("amount"):
                raise SchemaError("columns: map either amount, or quantity and price, not both")
            values["amount"] = None
        fmt = values.get("date_format")
        if fmt is not None and "%" not in fmt:
            raise SchemaError(f"columns.date_format {fmt!r} is not a strftime pattern (e.g. %d/%m/%Y)")
        headers = [v for k, v in values.items() if k != "date_format" and v]
        if len({h.casefold() for h in headers}) != len(headers):
            raise SchemaError("columns: two fields are mapped to the same header")
        return cls(**values)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, str]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @property
    def priced(self) -> bool:
        return self.amount is None


def rfm_schema() -> FeatureSchema:
    """The clustering features of kind ``rfm``: log1p of frequency and monetary (clipped at 0)."""
    return FeatureSchema(
        (
            Feature("recency_days", "numeric", "none", 0.0),
            Feature("frequency", "numeric", "log", 0.0),
            Feature("monetary", "numeric", "log"),
        ),
    )


# --------------------------------------------------------------------------- #
# Reading and aggregating a log


@dataclass
class LogFacts:
    """What reading a log counted, reported with the training result or a batch."""

    as_of: date
    n_transactions: int = 0
    skipped_rows: int = 0
    rows_after_as_of: int = 0
    skipped_customers: int = 0
    columns: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"as_of": self.as_of.isoformat()}


@dataclass
class RfmTable:
    """One row per customer with a counted purchase, in order of first appearance in the log."""

    frame: pd.DataFrame
    facts: LogFacts
