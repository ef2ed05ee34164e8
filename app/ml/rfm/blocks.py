"""Parsing a transaction log block by block with pyarrow and reducing it to per-customer sums."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc

from app.ml.preprocess import (
    MAX_LISTED_PROBLEMS,
    DataValidationError,
    _problem,
    _shown,
)
from app.ml.rfm.columns import EPOCH, LogColumns, LogFacts, RfmTable


class LogAggregator:
    """Block by block: parse, check and reduce to (customer, purchase) sums; merge at the end."""

    def __init__(self, columns: LogColumns, as_of: date | None) -> None:
        self.columns = columns
        self.as_of = as_of
        self.as_of_day = None if as_of is None else (as_of - EPOCH).days
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
            as_of = EPOCH + timedelta(days=self.last_day + 1)
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
        totals = []
        for rows in self.parts.drain():
            units = _purchases(rows)
            totals.append(_with_occasions(_customer_totals(units), _occasions(units)))
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
            occasions=customers.column("occasions").to_numpy()[order],
            occasion_spend=customers.column("occasion_spend").to_numpy()[order],
            first_spend=customers.column("first_spend").to_numpy()[order],
        )


def customer_frame(
    as_of: date,
    *,
    ids: pa.Array | pa.ChunkedArray | None,
    frequency: np.ndarray,
    net: np.ndarray,
    last_day: np.ndarray,
    first_day: np.ndarray,
    occasions: np.ndarray | None = None,
    occasion_spend: np.ndarray | None = None,
    first_spend: np.ndarray | None = None,
) -> pd.DataFrame:
    """The RFM table's columns from each buying customer's sums (days since 1970-01-01), in the given order.

    ``ids`` None leaves out ``customer_id`` (a table that is only trained on). With ``occasions`` (the
    distinct days with a counted purchase), ``occasion_spend`` (what those days' counted purchases
    sum to) and ``first_spend`` (the first such day's), the table also has the value models' inputs
    ``occasions`` and ``repeat_spend`` (the mean spend of the days after the first; NaN without one).
    """
    as_of_day = (as_of - EPOCH).days
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
    if occasions is not None and occasion_spend is not None and first_spend is not None:
        days = np.asarray(occasions).astype(np.int64)
        repeats = days - 1
        with np.errstate(invalid="ignore", divide="ignore"):
            spend = (np.asarray(occasion_spend, dtype=np.float64) - np.asarray(first_spend, dtype=np.float64)) / repeats
        columns["occasions"] = days
        columns["repeat_spend"] = np.where(repeats > 0, spend, np.nan)
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


def _occasions(units: pa.Table) -> pa.Table:
    """Per customer: its purchase occasions (distinct days with a counted purchase), what they sum to,
    and what its first one spent (the value models' inputs; app.ml.value)."""
    counted = units.filter(pc.greater_equal(units.column("amount"), 0.0))
    daily = counted.group_by(["customer_id", "day"], use_threads=False).aggregate([("amount", "sum")])
    daily = daily.sort_by([("customer_id", "ascending"), ("day", "ascending")])
    per_customer = daily.group_by("customer_id", use_threads=False).aggregate(
        [("day", "count"), ("amount_sum", "sum"), ("amount_sum", "first")]
    )
    return per_customer.rename_columns(["customer_id", "occasions", "occasion_spend", "first_spend"])


def _with_occasions(totals: pa.Table, occasions: pa.Table) -> pa.Table:
    """The customer totals with their occasion columns (0 for a customer without a counted purchase)."""
    joined = totals.join(occasions, keys="customer_id", join_type="left outer", use_threads=False)
    return joined.set_column(
        joined.schema.get_field_index("occasions"), "occasions", pc.fill_null(joined.column("occasions"), 0)
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
