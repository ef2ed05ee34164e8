"""Transaction log -> per-customer RFM table, quintile scores and the classic RFM segment names.

A log is read in blocks with pyarrow (its CSV reader and compute kernels:
no Python per row), each block reduced to one row per customer and purchase
(an order, or a purchase day), and those partial sums merged at the end, so
memory follows the number of purchases, not the size of the file.

Per customer, as of ``as_of`` (the contract's definitions):

- a purchase is an order (distinct ``order_id``) or, without that column, a
  purchase day; it counts when its net amount is not negative; its date is
  the first date among its rows;
- ``recency_days``: days from the last counted purchase to ``as_of``;
- ``frequency``: counted purchases;
- ``monetary``: the sum of every row's amount (returns netted);
- ``tenure_days``: days from the first counted purchase to ``as_of``;
- ``avg_order_value``: ``monetary / frequency``.

Rows dated after ``as_of`` are left out and counted; rows without a customer
id are skipped and counted; customers without a counted purchase are left out
of the table and counted.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.ipc

from app.ml.frames import match_columns
from app.ml.preprocess import (
    MAX_LISTED_PROBLEMS,
    CsvSource,
    DataValidationError,
    _problem,
    _read_header,
    _shown,
    _sniff,
    read_source,
)
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
_EPOCH = date(1970, 1, 1)
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


class _Aggregator:
    """Block by block: parse, check and reduce to (customer, purchase) sums; merge at the end."""

    def __init__(self, columns: LogColumns, as_of: date | None) -> None:
        self.columns = columns
        self.as_of = as_of
        self.as_of_day = None if as_of is None else (as_of - _EPOCH).days
        self.parts = _Parts()
        self.rows = 0
        self.skipped = 0
        self.after = 0
        self.last_day: int | None = None
        self.problems: list[dict[str, Any]] = []
        self.offending = 0

    def add(self, block: pa.Table | pa.RecordBatch) -> None:
        """One block with the canonical column names (text), rows numbered on from the last block."""
        n = block.num_rows
        first_row = self.rows + 1
        self.rows += n
        if n == 0:
            return
        parsed = parse_block(block, self.columns, pa.array(np.arange(first_row, first_row + n, dtype=np.int64)))
        self.skipped += parsed.skipped
        if parsed.table.num_rows == 0:
            return
        n_bad = int(pc.sum(parsed.bad).as_py() or 0)
        if n_bad:
            self._note_problems(parsed.table, parsed.checks, n_bad)
        if self.offending:
            return  # the log is refused: no need to aggregate any further
        block_last = pc.max(parsed.days).as_py()
        if block_last is not None:
            self.last_day = block_last if self.last_day is None else max(self.last_day, block_last)
        reduced = parsed.purchases()
        if self.as_of_day is not None:
            future = pc.greater(reduced.column("day"), self.as_of_day)
            n_future = int(pc.sum(future).as_py() or 0)
            if n_future:
                self.after += n_future
                reduced = reduced.filter(pc.invert(future))
        self.parts.add(reduced)

    def _note_problems(self, table: pa.Table, checks: list[tuple[str, pa.Array]], n_bad: int) -> None:
        self.offending += n_bad
        if len(self.problems) >= MAX_LISTED_PROBLEMS:
            return
        rows = table.column("row").to_numpy()
        for name, mask in checks:
            flagged = np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))
            raw = table.column(name)
            for i in flagged[:MAX_LISTED_PROBLEMS].tolist():
                value = raw[i].as_py()
                what = "a date (ISO 8601 or YYYYMMDD)" if name == "date" else "a number"
                if name == "date" and self.columns.date_format:
                    what = f"a date in the format {self.columns.date_format}"
                reason = f"empty {name}" if not str(value).strip() else f"not {what}: {_shown(value)}"
                self.problems.append(_problem(int(rows[i]), name, reason))
        self.problems.sort(key=lambda p: (p["row"], p["column"]))
        del self.problems[MAX_LISTED_PROBLEMS:]

    def finish(self, header: Mapping[str, str] | None = None, *, ids: bool = True) -> RfmTable:
        if self.rows == 0:
            raise DataValidationError("the log has a header but no rows", [_problem(None, None, "no data rows")])
        if self.offending:
            first = "; ".join(f"row {p['row']} {p['column']}: {p['reason']}" for p in self.problems[:3])
            raise DataValidationError(
                f"{self.offending} of {self.rows} rows have a date or amount that cannot be read (first: {first})",
                self.problems,
                self.offending,
            )
        if self.as_of is not None:
            as_of = self.as_of
        elif self.last_day is not None:
            as_of = _EPOCH + timedelta(days=self.last_day + 1)
        else:
            as_of = datetime.now(UTC).date()
        facts = LogFacts(
            as_of=as_of,
            n_transactions=self.rows,
            skipped_rows=self.skipped,
            rows_after_as_of=self.after,
            columns=dict(header or {}),
        )
        frame = self._customers(facts, ids)
        return RfmTable(frame, facts)

    def _customers(self, facts: LogFacts, ids: bool) -> pd.DataFrame:
        totals = [_customer_totals(_purchases(rows)) for rows in self.parts.drain()]
        if not totals:
            return _empty_table()
        customers = pa.concat_tables(totals)
        del totals
        frequency = customers.column("counted_sum").to_numpy().astype(np.int64)
        buying = frequency > 0
        facts.skipped_customers = int((~buying).sum())
        order = np.argsort(customers.column("row_min").to_numpy(), kind="stable")
        order = order[buying[order]]
        picked = pa.array(order)
        return customer_frame(
            facts.as_of,
            ids=customers.column("customer_id").take(picked) if ids else None,
            frequency=frequency[order],
            net=customers.column("net_sum").to_numpy()[order],
            last_day=customers.column("counted_day_max").take(picked).to_numpy(),
            first_day=customers.column("counted_day_min").take(picked).to_numpy(),
        )


def customer_frame(
    as_of: date,
    *,
    ids: pa.Array | pa.ChunkedArray | None,
    frequency: np.ndarray,
    net: np.ndarray,
    last_day: np.ndarray,
    first_day: np.ndarray,
) -> pd.DataFrame:
    """The RFM table's columns from each buying customer's sums (days since 1970-01-01), in the given order.

    ``ids`` None leaves out ``customer_id`` (a table that is only trained on).
    """
    as_of_day = (as_of - _EPOCH).days
    frequency = np.asarray(frequency).astype(np.int64)
    monetary = np.round(np.asarray(net, dtype=np.float64), 6)
    columns: dict[str, Any] = {}
    if ids is not None:
        columns["customer_id"] = ids.to_numpy(zero_copy_only=False).astype(object)
    columns |= {
        "recency_days": as_of_day - np.asarray(last_day).astype(np.int64),
        "frequency": frequency,
        "monetary": monetary,
        "tenure_days": as_of_day - np.asarray(first_day).astype(np.int64),
        "avg_order_value": np.round(monetary / frequency, 6),
    }
    return pd.DataFrame(columns)


@dataclass
class ParsedBlock:
    """A block of a log read: its rows with a customer id, their day and amount, which cells cannot be read."""

    table: pa.Table
    """The rows with a customer id (trimmed): the canonical columns as text, and ``row``."""
    days: pa.Array
    """Days since 1970-01-01 (int32), null where the date cannot be read."""
    amount: pa.Array
    """The row's amount (or quantity x price), null where it cannot be read."""
    checks: list[tuple[str, pa.Array]]
    """(column, mask of the rows whose cell in it cannot be read), date first."""
    skipped: int
    """Rows of the block without a customer id."""
    by_order: bool

    @property
    def bad(self) -> pa.Array:
        """Rows whose date or amount cannot be read."""
        bad = self.checks[0][1]
        for _, mask in self.checks[1:]:
            bad = pc.or_(bad, mask)
        return bad

    def purchases(self) -> pa.Table:
        """customer_id, unit (the order id; its day where there is none, or in a log without orders), amount,
        row and day of each row."""
        if self.by_order:
            unit = pc.utf8_trim_whitespace(self.table.column("order_id"))
            no_order = pc.equal(unit, "")
            if pc.any(no_order).as_py():
                # A row without an order id is a purchase of its day, as in a log without the column.
                day_key = pc.binary_join_element_wise("\x00", pc.cast(self.days, pa.string()), "")
                unit = pc.if_else(no_order, day_key, unit)
        else:
            unit = self.days
        return pa.table(
            {
                "customer_id": self.table.column("customer_id"),
                "unit": unit,
                "amount": self.amount,
                "row": self.table.column("row"),
                "day": self.days,
            }
        )


def parse_block(block: pa.Table | pa.RecordBatch, columns: LogColumns, row: pa.Array) -> ParsedBlock:
    """Read one block with the canonical column names (text; a null is an empty cell); ``row`` numbers its rows."""
    text = {name: _no_nulls(block.column(name)) for name in block.column_names}
    customer = pc.utf8_trim_whitespace(text.pop("customer_id"))
    has_id = pc.not_equal(customer, "")
    kept = int(pc.sum(has_id).as_py() or 0)
    table = pa.table(text | {"customer_id": customer, "row": row})
    if kept < block.num_rows:
        table = table.filter(has_id)
    days, bad_date = _days(table.column("date"), columns.date_format)
    if columns.priced:
        quantity, bad_quantity = _numbers(table.column("quantity"))
        price, bad_price = _numbers(table.column("price"))
        amount = pc.multiply(quantity, price)
        checks = [("date", bad_date), ("quantity", bad_quantity), ("price", bad_price)]
    else:
        amount, bad_amount = _numbers(table.column("amount"))
        checks = [("date", bad_date), ("amount", bad_amount)]
    return ParsedBlock(table, days, amount, checks, block.num_rows - kept, columns.order_id is not None)


SPILL_ROWS = 1_000_000
"""Rows of a log held in memory; beyond them the rows go to part files on disk, by customer."""
PARTS = 64


class _Parts:
    """A log's parsed rows, split by customer into parts that are aggregated one at a time.

    Up to SPILL_ROWS rows stay in memory as one part. Beyond that every block is split by a
    hash of the customer id into PARTS Arrow files in a temporary directory, so aggregating
    needs memory for one part (a PARTS-th of the log), never the whole log. A customer's rows
    are all in one part, so the parts are aggregated independently.
    """

    def __init__(self) -> None:
        self.held: list[pa.Table] = []
        self.held_rows = 0
        self.directory: tempfile.TemporaryDirectory[str] | None = None
        self.writers: list[pa.ipc.RecordBatchFileWriter] = []

    def add(self, rows: pa.Table) -> None:
        if self.directory is None:
            self.held.append(rows)
            self.held_rows += rows.num_rows
            if self.held_rows <= SPILL_ROWS:
                return
            self._open(rows.schema)
            rows = pa.concat_tables(self.held)
            self.held, self.held_rows = [], 0
        self._spill(rows)

    def _open(self, schema: pa.Schema) -> None:
        self.directory = tempfile.TemporaryDirectory(prefix="rfm-")
        self.writers = [
            pa.ipc.new_file(os.path.join(self.directory.name, f"part-{i:03d}.arrow"), schema) for i in range(PARTS)
        ]

    def _spill(self, rows: pa.Table) -> None:
        bucket = _buckets(rows.column("customer_id"), PARTS)
        rows = rows.take(pa.array(np.argsort(bucket, kind="stable")))
        ends = np.cumsum(np.bincount(bucket, minlength=PARTS)).tolist()
        for writer, start, end in zip(self.writers, [0, *ends[:-1]], ends, strict=True):
            if end > start:
                writer.write_table(rows.slice(start, end - start))

    def drain(self) -> Iterator[pa.Table]:
        """Each part's rows in turn (the held ones, or one file at a time); the files go afterwards."""
        if self.directory is None:
            if self.held:
                yield pa.concat_tables(self.held).combine_chunks()
            self.held = []
            return
        try:
            for writer in self.writers:
                writer.close()
            for i in range(PARTS):
                path = os.path.join(self.directory.name, f"part-{i:03d}.arrow")
                with pa.memory_map(path) as source:
                    rows = pa.ipc.open_file(source).read_all()
                if rows.num_rows:
                    yield rows
        finally:
            self.directory.cleanup()
            self.directory = None


def _no_nulls(text: Any) -> Any:
    return pc.fill_null(text, "") if text.null_count else text


def _buckets(ids: pa.ChunkedArray, parts: int) -> np.ndarray:
    """A part number 0..parts-1 for each customer id, from its length and last four bytes (vectorized)."""
    out = []
    for chunk in ids.chunks:
        if pa.types.is_large_string(chunk.type):
            width: type = np.int64
        else:
            chunk = chunk.cast(pa.string())
            width = np.int32
        n = len(chunk)
        offsets: np.ndarray = np.frombuffer(
            chunk.buffers()[1], dtype=width, count=n + 1, offset=chunk.offset * np.dtype(width).itemsize
        )
        data_buffer = chunk.buffers()[2]
        data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(1, np.uint8)
        starts, ends = offsets[:-1].astype(np.int64), offsets[1:].astype(np.int64)
        mixed = (ends - starts).astype(np.uint64)
        for back in (1, 2, 3, 4):
            at = ends - back
            inside = at >= starts
            byte = np.where(inside, data[np.where(inside, at, 0).clip(0, len(data) - 1)], 0).astype(np.uint64)
            mixed = mixed * np.uint64(1_000_003) + byte
        out.append((mixed % np.uint64(parts)).astype(np.int64))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _customer_totals(units: pa.Table) -> pa.Table:
    """Per customer: net total, first row, counted purchases and the first and last counted day."""
    counted = pc.greater_equal(units.column("amount"), 0.0)
    per_unit = pa.table(
        {
            "customer_id": units.column("customer_id"),
            "net": units.column("amount"),
            "row": units.column("row"),
            "counted": pc.cast(counted, pa.int64()),
            "counted_day": pc.if_else(counted, units.column("day"), pa.scalar(None, pa.int32())),
        }
    )
    return per_unit.group_by("customer_id", use_threads=False).aggregate(
        [("net", "sum"), ("row", "min"), ("counted", "sum"), ("counted_day", "max"), ("counted_day", "min")]
    )


def _purchases(rows: pa.Table) -> pa.Table:
    """One row per (customer_id, unit): the amounts summed, the first row and the first day kept.

    Single-threaded: the threaded hash aggregation merges its partial tables at about three
    times the cost here.
    """
    grouped = rows.group_by(["customer_id", "unit"], use_threads=False).aggregate(
        [("amount", "sum"), ("row", "min"), ("day", "min")]
    )
    return grouped.rename_columns({"amount_sum": "amount", "row_min": "row", "day_min": "day"})


def _empty_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": pd.Series([], dtype=object),
            "recency_days": pd.Series([], dtype=np.int64),
            "frequency": pd.Series([], dtype=np.int64),
            "monetary": pd.Series([], dtype=np.float64),
            "tenure_days": pd.Series([], dtype=np.int64),
            "avg_order_value": pd.Series([], dtype=np.float64),
        }
    )


def _days(text: pa.ChunkedArray | pa.Array, date_format: str | None) -> tuple[pa.Array, pa.Array]:
    """(days since 1970-01-01 as int32, null where unreadable; the unreadable mask)."""
    text = pc.utf8_trim_whitespace(text)
    if len(text) == 0:
        nothing = pa.array([], pa.int32())
        return nothing, pa.array([], pa.bool_())
    fast = None if date_format is not None else _iso_days(text)
    if fast is not None:
        return fast, pc.is_null(fast)
    if date_format is not None:
        stamps = pc.strptime(text, format=date_format, unit="s", error_is_null=True)
    else:
        length = pc.utf8_length(text)
        compact = pc.fill_null(pc.and_(pc.equal(length, 8), pc.utf8_is_digit(text)), False)
        n_compact = int(pc.sum(compact).as_py() or 0)
        iso = None
        if n_compact < len(text):
            separator = pc.utf8_slice_codeunits(text, 10, 11)
            shaped = pc.or_(
                pc.equal(length, 10),
                pc.and_(pc.greater(length, 10), pc.is_in(separator, value_set=pa.array(["T", "t", " "]))),
            )
            head = pc.utf8_slice_codeunits(text, 0, 10)
            parsed = _real_dates(head, pc.strptime(head, format="%Y-%m-%d", unit="s", error_is_null=True), "%Y-%m-%d")
            iso = pc.if_else(shaped, parsed, pa.scalar(None, parsed.type))
        if n_compact:
            packed = _real_dates(text, pc.strptime(text, format="%Y%m%d", unit="s", error_is_null=True), "%Y%m%d")
            stamps = packed if iso is None else pc.if_else(compact, packed, iso)
        else:
            assert iso is not None
            stamps = iso
    days = pc.cast(pc.cast(stamps, pa.date32()), pa.int32())
    return days, pc.is_null(days)


def _iso_days(text: Any) -> Any:
    """Days of a block whose dates all have one shape (YYYY-MM-DD, with or without a time, or YYYYMMDD)
    and are all real dates, in one strict cast; None when any is not, for the slower path to sort out."""
    length = pc.utf8_length(text)
    if pc.all(pc.equal(length, 10)).as_py():
        head = text
    elif pc.all(pc.equal(length, 8)).as_py():
        head = pc.binary_join_element_wise(
            pc.utf8_slice_codeunits(text, 0, 4),
            pc.utf8_slice_codeunits(text, 4, 6),
            pc.utf8_slice_codeunits(text, 6, 8),
            "-",
        )
    elif (
        pc.all(pc.greater(length, 10)).as_py()
        and pc.all(pc.is_in(pc.utf8_slice_codeunits(text, 10, 11), value_set=pa.array(["T", "t", " "]))).as_py()
    ):
        head = pc.utf8_slice_codeunits(text, 0, 10)
    else:
        return None
    try:
        return pc.cast(pc.cast(head, pa.date32()), pa.int32())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def _real_dates(text: Any, stamps: Any, fmt: str) -> Any:
    """``stamps`` where they write back as ``text``: strptime rolls 2024-02-30 over to March, which is no date."""
    same = pc.fill_null(pc.equal(pc.strftime(stamps, format=fmt), text), False)
    return pc.if_else(same, stamps, pa.scalar(None, stamps.type))


def _numbers(text: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.Array]:
    """(float64 values, null where unreadable; the unreadable mask): empty, text or not finite."""
    text = pc.utf8_trim_whitespace(text)
    try:
        values = pc.cast(text, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raw = pd.Series(text.to_numpy(zero_copy_only=False), dtype=object)
        values = pa.array(pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64), from_pandas=True)
    values = pc.if_else(pc.fill_null(pc.is_finite(values), False), values, pa.scalar(None, pa.float64()))
    return values, pc.is_null(values)


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
    aggregator = _Aggregator(used, as_of)
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
    aggregator = _Aggregator(columns, as_of or datetime.now(UTC).date())
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


# --------------------------------------------------------------------------- #
# Scores and segments


def fit_cuts(frame: pd.DataFrame) -> dict[str, list[float]]:
    """The 20/40/60/80 % quantiles of recency_days, frequency and monetary over the training customers."""
    return {
        name: [round(float(q), 6) for q in np.quantile(frame[name].to_numpy(dtype=np.float64), QUANTILES)]
        for name in RFM_FEATURES
    }


def scores(values: Mapping[str, Any], cuts: Mapping[str, Sequence[float]]) -> dict[str, np.ndarray]:
    """r/f/m scores 1..5 of arrays of recency_days, frequency and monetary.

    f and m: 1 + the number of cut points below the value; r: 1 + the
    number of cut points above it (tied cuts leave some scores unused).
    """
    recency = np.asarray(values["recency_days"], dtype=np.float64)
    frequency = np.asarray(values["frequency"], dtype=np.float64)
    monetary = np.asarray(values["monetary"], dtype=np.float64)
    r_cuts, f_cuts, m_cuts = (np.asarray(cuts[name], dtype=np.float64) for name in RFM_FEATURES)
    return {
        "r_score": 1 + len(r_cuts) - np.searchsorted(r_cuts, recency, side="right"),
        "f_score": 1 + np.searchsorted(f_cuts, frequency, side="left"),
        "m_score": 1 + np.searchsorted(m_cuts, monetary, side="left"),
    }


_GRID = np.array(SEGMENT_GRID, dtype=object)


def rfm_segments(r_score: np.ndarray, f_score: np.ndarray) -> np.ndarray:
    """The classic segment name of each (r_score, f_score)."""
    return _GRID[np.asarray(r_score, dtype=np.int64) - 1, np.asarray(f_score, dtype=np.int64) - 1]


def scored_table(frame: pd.DataFrame, cuts: Mapping[str, Sequence[float]]) -> pd.DataFrame:
    """``frame`` with r_score, f_score, m_score and rfm_segment added."""
    out = frame.copy()
    got = scores(frame, cuts)
    for name, value in got.items():
        out[name] = value
    out["rfm_segment"] = rfm_segments(got["r_score"], got["f_score"])
    return out


def one_customer(record: Mapping[str, Any], cuts: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """One customer's RFM values with their scores and segment (avg_order_value when it is defined)."""
    got = {name: int(v[0]) for name, v in scores({k: [record[k]] for k in RFM_FEATURES}, cuts).items()}
    row: dict[str, Any] = {name: record[name] for name in RFM_FEATURES}
    for name in ("tenure_days", "avg_order_value"):
        if record.get(name) is not None:
            row[name] = record[name]
    if "avg_order_value" not in row and record["frequency"]:
        row["avg_order_value"] = round(float(record["monetary"]) / float(record["frequency"]), 6)
    return row | got | {"rfm_segment": SEGMENT_GRID[got["r_score"] - 1][got["f_score"] - 1]}


def clustering_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """What K-Means sees (before its log1p and scaling): monetary clipped at 0."""
    return pd.DataFrame(
        {
            "recency_days": frame["recency_days"].to_numpy(dtype=np.float64),
            "frequency": frame["frequency"].to_numpy(dtype=np.float64),
            "monetary": np.maximum(frame["monetary"].to_numpy(dtype=np.float64), 0.0),
        }
    )


# --------------------------------------------------------------------------- #
# Segment names in RFM words

_SPEND_WORDS = ("big spenders", "low spenders", "mid spenders")


NEW_TENURE_DAYS = 90
"""A recent segment whose customers first bought this many days ago or less, on average, is new."""


def segment_names(mean_scores: np.ndarray, mean_tenure: np.ndarray | None = None) -> list[str]:
    """A name per segment from its members' mean (r, f, m) scores, unique within the model.

    The base is the classic name of the rounded (r, f), except that a recent
    segment (r 4 or 5) of short tenure (``NEW_TENURE_DAYS``) is "New
    customers" whatever its frequency; segments that share a base get a
    further word from their spending ("At risk, big spenders").
    """
    k = len(mean_scores)
    rounded = np.clip(np.floor(mean_scores + 0.5).astype(np.int64), 1, 5)
    base = [SEGMENT_GRID[r - 1][f - 1] for r, f, _ in rounded.tolist()]
    if mean_tenure is not None:
        for i in range(k):
            if rounded[i, 0] >= 4 and mean_tenure[i] <= NEW_TENURE_DAYS:
                base[i] = "New customers"
    names = list(base)
    for name in set(base):
        members = [i for i in range(k) if base[i] == name]
        if len(members) < 2:
            continue
        ranked = sorted(members, key=lambda i: (-mean_scores[i, 2], i))
        words = [_SPEND_WORDS[0], *([_SPEND_WORDS[2]] * (len(ranked) - 2)), _SPEND_WORDS[1]]
        for i, word in zip(ranked, words, strict=True):
            names[i] = f"{name}, {word}"
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = f"{name} {seen[name]}"
    return names


def describe_segment(size: int, share: float, revenue_share: float, means: Mapping[str, float]) -> str:
    return (
        f"{size:,} customers ({share:.1f}%) bringing {revenue_share:.1f}% of revenue: last purchase "
        f"{means['recency_days']:.0f} days ago on average, {means['frequency']:.1f} purchases, "
        f"{means['monetary']:,.2f} spent in all ({means['avg_order_value']:,.2f} a purchase)."
    )


def parse_as_of(value: str | date | None) -> date | None:
    """An ``as_of`` query value: an ISO date (a time part is ignored) or YYYYMMDD; raises ValueError."""
    if value is None or isinstance(value, date):
        return value
    text = value.strip()
    if len(text) == 8 and text.isdigit():
        return datetime.strptime(text, "%Y%m%d").date()
    return date.fromisoformat(text[:10])


__all__ = [
    "MAX_TRANSACTIONS",
    "QUANTILES",
    "RFM_FEATURES",
    "SCORE_COLUMNS",
    "SEGMENT_GRID",
    "TABLE_COLUMNS",
    "LogColumns",
    "LogFacts",
    "RfmTable",
    "clustering_frame",
    "describe_segment",
    "fit_cuts",
    "one_customer",
    "parse_as_of",
    "read_log",
    "rfm_schema",
    "rfm_segments",
    "scored_table",
    "scores",
    "segment_names",
    "transactions_table",
]
