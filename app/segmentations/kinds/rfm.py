"""Kind `rfm`: a transaction log in; per-customer RFM rows and their segments out.

The log itself is read and aggregated by `app.ml.rfm` (pyarrow, block by block) in a worker thread;
the command line and the Spark engine use this module's table functions too.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from datetime import date
from typing import IO, Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.errors import InvalidInput
from app.ml import rfm
from app.ml.preprocess import DataValidationError
from app.ml.schema import FeatureSchema, SchemaError
from app.ml.value import DEFAULT_HORIZON_DAYS, VALUE_FIELDS, ValueModel, table_summary
from app.segmentations.csv_answers import SPOOL_BYTES, ScoredBatch, inert_column
from app.segmentations.kinds.base import Assigned
from app.segmentations.kinds.custom import score_declared_chunk
from app.segmentations.kinds.records import declared_customer_adapter
from app.segmentations.scoring import ChunkScores
from app.versions.observed import BatchObserver
from app.versions.store import ModelStore, SegmentationInfo, ServedModel

RFM_KIND = "rfm"
ANSWER_COLUMNS = (*rfm.TABLE_COLUMNS, *rfm.SCORE_COLUMNS)
"""A scored log's columns before cluster, cluster_name and confidence."""


def log_columns(store: ModelStore) -> rfm.LogColumns:
    return info_columns(store.segmentation)


def info_columns(info: SegmentationInfo) -> rfm.LogColumns:
    return rfm.LogColumns.from_mapping(info.feature_schema.get("columns"))


def declared_schema(columns: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the `segmentations` row keeps for a new rfm segmentation: its column mapping."""
    try:
        mapping = rfm.LogColumns.from_mapping(columns)
    except SchemaError as exc:
        raise InvalidInput(str(exc)) from None
    return {"kind": RFM_KIND, "columns": mapping.to_dict()}


def _no_customers(facts: rfm.LogFacts) -> DataValidationError:
    return DataValidationError(
        f"no customer in the log has a counted purchase as of {facts.as_of.isoformat()} "
        f"({facts.skipped_customers} customers whose purchases net to a negative amount, "
        f"{facts.skipped_rows} rows without a customer id, {facts.rows_after_as_of} rows after as_of)",
        [{"row": None, "line": None, "column": None, "reason": "no customer with a counted purchase"}],
    )


async def train_table(
    store: ModelStore, table: rfm.RfmTable, *, n_clusters: int | None, random_state: int, by: str
) -> ServedModel:
    if table.frame.empty:
        raise _no_customers(table.facts)
    # The child needs the numbers only: customer ids stay here.
    numbers = rfm.RfmTable(table.frame.drop(columns="customer_id", errors="ignore"), table.facts)
    return await store.train(numbers, n_clusters=n_clusters, random_state=random_state, created_by=by)


def train_facts(served: ServedModel) -> dict[str, Any]:
    """The log's counts for the train result."""
    log = (served.metadata.get("rfm") or {}).get("log") or {}
    return {
        "n_transactions": log.get("n_transactions"),
        "skipped_customers": log.get("skipped_customers", 0),
        "rows_after_as_of": log.get("rows_after_as_of", 0),
        "as_of": log.get("as_of"),
        "columns": log.get("columns"),
        "value_model": served.metadata.get("value_model"),
        "warnings": list(served.metadata.get("warnings") or []),
    }


def cuts(served: ServedModel) -> dict[str, list[float]]:
    return served.metadata["rfm"]["cuts"]


# --- one customer -------------------------------------------------------------------------------


SUMMARY_HAS_NO_VALUE = (
    "p_alive, expected_purchases, expected_order_value and clv need the customer's purchase days: "
    "send its `transactions` instead of its RFM values"
)
NO_VALUE_MODEL = "this version has no value model (see its warnings): p_alive, expected purchases and clv are null"


def value_columns(served: ServedModel, frame: pd.DataFrame, horizon_days: int) -> dict[str, np.ndarray]:
    """Each customer's VALUE_FIELDS at `horizon_days` (NaN where the version or the rows cannot give them)."""
    model = ValueModel.from_dict(served.metadata.get("value_model"))
    summary = table_summary(frame) if model is not None else None
    if model is None or summary is None:
        return {name: np.full(len(frame), np.nan) for name in VALUE_FIELDS}
    return {name: np.round(values, 6) for name, values in model.predict(summary, horizon_days).items()}


def value_warning(served: ServedModel, *, from_summary: bool) -> str | None:
    """Why one customer's value fields are null, if they are."""
    if served.metadata.get("value_model") is None:
        return NO_VALUE_MODEL
    return SUMMARY_HAS_NO_VALUE if from_summary else None


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def customer_values(
    served: ServedModel,
    *,
    customer: Mapping[str, Any] | None,
    transactions: Sequence[Any] | None,
    as_of: date | None,
    horizon_days: int = DEFAULT_HORIZON_DAYS,
) -> tuple[dict[str, Any], dict[str, float | None]]:
    """One customer's RFM row and its VALUE_FIELDS (null from RFM values alone)."""
    value: dict[str, float | None] = dict.fromkeys(VALUE_FIELDS)
    if transactions is not None:
        items = [t if isinstance(t, Mapping) else t.model_dump() for t in transactions]
        table = rfm.transactions_table(items, as_of=as_of)
        if table.frame.empty:
            raise DataValidationError(
                "these transactions hold no counted purchase as of "
                f"{table.facts.as_of.isoformat()} (each order nets to a negative amount, or all are later)",
                [{"row": None, "line": None, "column": None, "reason": "no counted purchase"}],
            )
        record = table.frame.iloc[0].to_dict()
        record.pop("customer_id", None)
        values = {
            "recency_days": int(record["recency_days"]),
            "frequency": int(record["frequency"]),
            "monetary": float(record["monetary"]),
            "tenure_days": int(record["tenure_days"]),
            "avg_order_value": float(record["avg_order_value"]),
        }
        value = {name: _finite(column[0]) for name, column in value_columns(served, table.frame, horizon_days).items()}
    else:
        assert customer is not None
        values = dict(customer)
    return rfm.one_customer(values, cuts(served)), value


def clustering_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """What the scorer takes from an RFM row: monetary clipped at 0, as at training."""
    monetary = row["monetary"]
    return {
        "recency_days": row["recency_days"],
        "frequency": row["frequency"],
        "monetary": max(float(monetary), 0.0),
    }


# --- batches ------------------------------------------------------------------------------------


def _batch(
    served: ServedModel,
    table: pd.DataFrame,
    *,
    as_csv: bool,
    observer: BatchObserver | None = None,
    horizon_days: int = DEFAULT_HORIZON_DAYS,
) -> ScoredBatch:
    scored = rfm.scored_table(table, cuts(served))
    scored = scored[[c for c in ANSWER_COLUMNS if c in scored.columns]].assign(
        **value_columns(served, table, horizon_days)
    )
    features = rfm.clustering_frame(scored)
    labels, confidence = served.model.predict_with_confidence(features)
    explained = None
    if observer is not None:
        explained = observer.observe({name: features[name].to_numpy() for name in rfm.RFM_FEATURES}, labels)
    answer = _csv_answer(served, scored, labels, confidence, explained) if as_csv else None
    return ScoredBatch(
        model=served,
        labels=labels,
        confidence=confidence,
        n_rows=len(scored),
        csv_answer=answer,
        fields=scored,
        observer=observer,
    )


def _csv_answer(
    served: ServedModel,
    scored: pd.DataFrame,
    labels: np.ndarray,
    confidence: np.ndarray,
    explained: tuple[np.ndarray, np.ndarray] | None,
) -> IO[bytes]:
    """The per-customer table with its segments as CSV, written by pyarrow (a million rows in about a second)."""
    columns = [c for c in ANSWER_COLUMNS if c in scored.columns]
    results: dict[str, Any] = {
        "cluster": labels,
        "cluster_name": np.asarray(served.names, dtype=object)[labels],
        "confidence": np.round(confidence, 6),
    }
    results |= _value_arrays(scored)
    if explained is not None:
        results |= {"top_feature": explained[0], "margin": np.round(explained[1], 6)}
    table = pa.table(
        {c: inert_column(scored[c]) if c == "customer_id" else scored[c].to_numpy() for c in columns} | results
    )
    out = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
    out.write((",".join(table.column_names) + "\n").encode())
    pacsv.write_csv(table, out, pacsv.WriteOptions(include_header=False, quoting_style="needed"))
    out.seek(0)
    return out


def _value_arrays(scored: pd.DataFrame) -> dict[str, pa.Array]:
    """The value columns as answers write them: a value that cannot be given is empty (null), not NaN."""
    return {
        name: pa.array(scored[name].to_numpy(dtype=np.float64), from_pandas=True)
        if name in scored.columns
        else pa.nulls(len(scored), pa.float64())
        for name in VALUE_FIELDS
    }


def answer_table(served: ServedModel, scored: ScoredBatch) -> pa.Table:
    """A scored batch's per-customer answer as Parquet holds it: the table's and scores' columns, then
    cluster, cluster_name, confidence and the value columns."""
    assert scored.fields is not None
    fields = scored.fields
    return pa.table(
        {c: fields[c].to_numpy() for c in ANSWER_COLUMNS if c in fields.columns}
        | {
            "cluster": scored.labels,
            "cluster_name": np.asarray(served.names, dtype=object)[scored.labels],
            "confidence": np.round(scored.confidence, 6),
        }
        | _value_arrays(fields)
    )


def score_table(served: ServedModel, table: pd.DataFrame) -> pa.Table:
    """Customers' RFM rows (``rfm.customer_frame``) scored, as ``answer_table`` gives them (blocking)."""
    return answer_table(served, _batch(served, table, as_csv=False))


def score_log(
    served: ServedModel,
    fh: IO[bytes],
    columns: rfm.LogColumns,
    *,
    as_of: date | None,
    as_csv: bool,
    observer: BatchObserver | None = None,
    horizon_days: int = DEFAULT_HORIZON_DAYS,
) -> ScoredBatch:
    """A transaction log → one scored row per customer, in order of first appearance (blocking)."""
    table = rfm.read_log(fh, columns, as_of=as_of)
    if table.frame.empty:
        raise _no_customers(table.facts)
    return _batch(served, table.frame, as_csv=as_csv, observer=observer, horizon_days=horizon_days)


def score_rows(
    served: ServedModel, rows: Sequence[Mapping[str, Any]], *, as_csv: bool, observer: BatchObserver | None = None
) -> ScoredBatch:
    """Customers given by their RFM values (a JSON batch, already checked), scored (blocking)."""
    frame = pd.DataFrame({name: np.asarray([row[name] for row in rows], dtype=np.float64) for name in rfm.RFM_FEATURES})
    frame["avg_order_value"] = np.round(
        np.divide(frame["monetary"], frame["frequency"], out=np.full(len(frame), np.nan), where=frame["frequency"] > 0),
        6,
    )
    return _batch(served, frame, as_csv=as_csv, observer=observer)


class RfmKind:
    name: ClassVar[str] = RFM_KIND
    description: ClassVar[str] = "recency, frequency and monetary value from a transaction log"
    default_dataset: ClassVar[bool] = False
    takes_as_of: ClassVar[bool] = True
    takes_transactions: ClassVar[bool] = True
    training_file: ClassVar[str] = "a transaction log"

    def declare(
        self, *, features: list[dict[str, Any]] | None, id_column: str | None, columns: dict[str, Any] | None
    ) -> dict[str, Any]:
        if features or id_column:
            raise InvalidInput(
                "A segmentation of kind rfm clusters recency, frequency and monetary value computed from a "
                "transaction log: leave `features` and `id_column` out, map the log's headers in `columns`"
            )
        return declared_schema(columns)

    def schema(self, info: SegmentationInfo) -> FeatureSchema:
        return rfm.rfm_schema()

    def public(self, info: SegmentationInfo) -> dict[str, Any]:
        return {"columns": info.feature_schema.get("columns")}

    def record_model(self, info: SegmentationInfo) -> TypeAdapter[Any]:
        return declared_customer_adapter(self.schema(info), f"Customer_{info.name}")

    async def train(
        self,
        store: ModelStore,
        upload: IO[bytes] | None,
        *,
        settings: Settings,
        n_clusters: int | None,
        random_state: int,
        by: str,
        as_of: date | None,
    ) -> ServedModel:
        """A new version trained on the uploaded log: aggregated here (a worker thread), fitted in the child."""
        assert upload is not None  # the service asks for a file first
        upload.seek(0)
        table = await run_in_threadpool(rfm.read_log, upload, log_columns(store), as_of=as_of, ids=False)
        return await train_table(store, table, n_clusters=n_clusters, random_state=random_state, by=by)

    def train_facts(self, served: ServedModel) -> dict[str, Any]:
        return train_facts(served)

    def assign(
        self,
        served: ServedModel,
        customer: Any,
        *,
        transactions: Sequence[Any] | None,
        as_of: date | None,
        horizon_days: int = DEFAULT_HORIZON_DAYS,
    ) -> Assigned:
        row, value = customer_values(
            served, customer=customer, transactions=transactions, as_of=as_of, horizon_days=horizon_days
        )
        record = clustering_record(row)
        cluster, name, confidence, warnings = served.assign_declared([record])[0]
        missing = value_warning(served, from_summary=transactions is None)
        if missing is not None:
            warnings = [*warnings, missing]
        return Assigned(row, cluster, name, confidence, warnings, explained_record=record, answer=value)

    async def score_upload(
        self,
        served: ServedModel,
        upload: IO[bytes],
        *,
        store: ModelStore,
        as_csv: bool,
        as_of: date | None,
        observer: BatchObserver | None,
        horizon_days: int = DEFAULT_HORIZON_DAYS,
    ) -> ScoredBatch:
        upload.seek(0)
        columns = log_columns(store)
        return await run_in_threadpool(
            lambda: score_log(
                served, upload, columns, as_of=as_of, as_csv=as_csv, observer=observer, horizon_days=horizon_days
            )
        )

    def score_rows(
        self,
        served: ServedModel,
        rows: Sequence[Any],
        *,
        as_csv: bool,
        observer: BatchObserver | None,
        horizon_days: int = DEFAULT_HORIZON_DAYS,
    ) -> ScoredBatch:
        return score_rows(served, rows, as_csv=as_csv, observer=observer)

    async def comparison_data(self, store: ModelStore, upload: IO[bytes] | None, *, settings: Settings) -> Any:
        """The customers of a transaction log, as K-Means sees them (the same for both versions)."""
        assert upload is not None  # the service asks for a file first
        upload.seek(0)
        table = await run_in_threadpool(rfm.read_log, upload, log_columns(store), as_of=None, ids=False)
        if table.frame.empty:
            raise _no_customers(table.facts)
        return rfm.clustering_frame(table.frame)

    def batch_columns(self, served: ServedModel, names: Sequence[str]) -> tuple[dict[str, str], set[str]]:
        from app.ml.frames import match_columns

        schema = served.model.schema_
        found = match_columns(names, schema.names, required=schema.names)
        return found, {found[f.name] for f in schema.features if f.numeric}

    def check_columns(self, columns: Any) -> Any:
        return None  # the model's score_frame names a missing column

    def score_chunk(self, served: ServedModel, frame: pd.DataFrame) -> ChunkScores:
        return score_declared_chunk(served, frame)
