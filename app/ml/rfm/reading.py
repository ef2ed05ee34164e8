"""Reading a whole transaction log (CSV or Parquet) or a request's transactions into an RFM table."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.ipc

from app.ml.frames import match_columns
from app.ml.preprocess import (
    CsvSource,
    DataValidationError,
    _problem,
    _read_header,
    _sniff,
    read_source,
)
from app.ml.rfm.blocks import LogAggregator
from app.ml.rfm.columns import BLOCK_BYTES, PARQUET_BATCH_ROWS, LogColumns, RfmTable


def log_header(header: list[Any], columns: LogColumns) -> dict[str, str]:
    """canonical name -> the header that holds it; an unmapped order_id (or quantity and price when the
    log has no amount) is taken when a column of that name is there."""
    wanted = {"customer_id": columns.customer_id, "date": columns.date}
    optional: dict[str, str] = {}
    if columns.priced:
        wanted |= {"quantity": columns.quantity or "quantity", "price": columns.price or "price"}
    else:
        wanted["amount"] = columns.amount or "amount"
    if columns.order_id is not None:
        wanted["order_id"] = columns.order_id
    else:
        optional["order_id"] = "order_id"
    keys = {str(h).strip().casefold() for h in header}
    if not columns.priced and columns.amount == "amount" and "amount" not in keys:
        if {"quantity", "price"} <= keys:  # a log of lines: amount = quantity x price
            del wanted["amount"]
            wanted |= {"quantity": "quantity", "price": "price"}
    for name, raw in optional.items():
        if raw.casefold() in keys:
            wanted[name] = raw
    found = match_columns(header, list(wanted.values()), required=list(wanted.values()))
    return {name: str(found[raw]) for name, raw in wanted.items()}


def found_columns(header: Mapping[str, str], columns: LogColumns) -> LogColumns:
    """The mapping with the headers ``log_header`` found in a log (an order id or quantity and price taken)."""
    return LogColumns(
        customer_id=header["customer_id"],
        date=header["date"],
        amount=header.get("amount"),
        order_id=header.get("order_id"),
        quantity=header.get("quantity"),
        price=header.get("price"),
        date_format=columns.date_format,
    )


def read_log(
    source: CsvSource,
    columns: LogColumns,
    *,
    as_of: date | None = None,
    progress: Callable[[int], None] | None = None,
    block_bytes: int = BLOCK_BYTES,
    ids: bool = True,
) -> RfmTable:
    """The RFM table of a transaction log, CSV or Parquet (a path, bytes or a binary file object).

    Raises DataValidationError, and nothing else, for a file that is not a
    readable CSV, mapped columns that are missing (all named at once), or
    rows whose date or amount cannot be read (the first ten listed, all
    counted). ``progress`` is called with the bytes read so far. ``ids=False``
    leaves ``customer_id`` out of the table (one to train on: a Python string
    a customer saved).
    """
    return read_source(source, lambda fh: _read_log(fh, columns, as_of, progress, block_bytes, ids))


def _read_log(
    fh: IO[bytes],
    columns: LogColumns,
    as_of: date | None,
    progress: Callable[[int], None] | None,
    block_bytes: int,
    ids: bool = True,
) -> RfmTable:
    start = fh.tell()
    parquet = fh.read(4) == b"PAR1"
    fh.seek(start)
    if not parquet:
        _sniff(fh)
    if parquet:
        import pyarrow.parquet as pq

        source = pq.ParquetFile(fh)
        header = log_header(source.schema_arrow.names, columns)
    else:
        header = log_header(_read_header(fh), columns)
    used = found_columns(header, columns)
    rename = {raw: name for name, raw in header.items()}
    aggregator = LogAggregator(used, as_of)
    try:
        if parquet:
            batches = source.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(header.values()))
            for done, batch in enumerate(batches, start=1):
                # Every column as text, as a CSV reads it: dates, amounts and ids go through the same checks.
                block = pa.table({rename[c]: pc.cast(batch.column(c), pa.string()) for c in batch.schema.names})
                aggregator.add(block)
                if progress is not None:
                    progress(int(fh.tell() * done / max(source.num_row_groups, 1)))
        else:
            reader = pacsv.open_csv(
                fh,
                read_options=pacsv.ReadOptions(block_size=block_bytes, use_threads=True),
                convert_options=pacsv.ConvertOptions(
                    include_columns=list(header.values()),
                    column_types=dict.fromkeys(header.values(), pa.string()),
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                ),
            )
            for batch in reader:
                block = pa.Table.from_batches([batch]).rename_columns([rename[c] for c in batch.schema.names])
                aggregator.add(block)
                if progress is not None:
                    progress(fh.tell() - start)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        kind = "Parquet" if parquet else "CSV"
        raise DataValidationError(
            f"the log could not be read as {kind} after row {aggregator.rows}: {_arrow_reason(exc)}",
            [_problem(aggregator.rows + 1 if aggregator.rows else None, None, _arrow_reason(exc))],
        ) from None
    return aggregator.finish(header, ids=ids)


def _arrow_reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "UTF8" in text or "UTF-8" in text:
        return "the file is not UTF-8 text"
    return text[:200]


def transactions_table(transactions: Sequence[Mapping[str, Any]], *, as_of: date | None) -> RfmTable:
    """One customer's RFM row from their transactions (``date``, ``amount``, ``order_id``?).

    ``as_of`` defaults to today (UTC). Raises DataValidationError naming the
    transactions (``row`` = 1-based position) whose date or amount cannot be read.
    """
    has_order = any(t.get("order_id") not in (None, "") for t in transactions)
    columns = LogColumns(order_id="order_id" if has_order else None)
    aggregator = LogAggregator(columns, as_of or datetime.now(UTC).date())
    block = {
        "customer_id": pa.array(["customer"] * len(transactions), pa.string()),
        "date": pa.array([_text(t.get("date")) for t in transactions], pa.string()),
        "amount": pa.array([_text(t.get("amount")) for t in transactions], pa.string()),
    }
    if has_order:
        block["order_id"] = pa.array([_text(t.get("order_id")) for t in transactions], pa.string())
    aggregator.add(pa.table(block))
    return aggregator.finish()


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return repr(value)
    return str(value)
