"""The customer base in SQL: runs, staging, the merge of a run into a new base, and the reads.

Every write is its own short transaction, so prediction history keeps being written beside a run
on SQLite (one writer at a time): the staging goes in batches, the merge range by range of customer
ids, and a run lands with one small UPDATE (its status). The merge compares the run's staging with
the current base inside the database (INSERT ... SELECT joins); Python only holds the boundaries.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.concurrency import run_in_threadpool

from app.core.database import Database
from app.core.tables import utcnow
from app.customers.tables import (
    ACTIVE,
    COMPLETED,
    FAILED,
    GONE,
    RUNNING,
    CustomerChange,
    CustomerMembership,
    CustomerRun,
    CustomerStaging,
)
from app.versions.lease import rows_updated

if TYPE_CHECKING:
    from app.customers.scoring import ScoredCustomers

STAGING_COLUMNS = ("run_id", "customer_id", "segment_key", "cluster_id", "confidence", "p_alive", "clv")
SQLITE_BATCH = 50_000
"""Rows per write transaction on SQLite: each holds the one write lock for a fraction of a second."""
POSTGRES_BATCH = 250_000
"""Rows per COPY on PostgreSQL. Its merge is one range: MVCC lets readers and writers on meanwhile, and
one hash join over the whole base costs less than a scan of it per range."""
POSTGRES_WORK_MEM = "128MB"
KEPT_SNAPSHOTS = 2
"""Completed runs whose base stays: the current one, and the one before for readers still on it."""
CLEANUP_BATCH = 20_000
STREAM_PAGE = 20_000

Landing = Callable[[AsyncSession, CustomerRun], Awaitable[None]]
"""What else goes into the landing transaction (the events), given the landed run."""


def _range(column: str, lo: str | None, hi: str | None) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{column} > :lo")
    if hi is not None:
        parts.append(f"{column} <= :hi")
    return " AND ".join(parts) or "1 = 1"


def boundaries(scored: ScoredCustomers, batch: int) -> list[tuple[str | None, str | None]]:
    """Ranges `(lo, hi]` of customer ids covering every id, `batch` of the run's customers in each."""
    ids = scored.ids
    cuts = [str(ids[i - 1]) for i in range(batch, len(ids), batch)]
    edges: list[str | None] = [None, *cuts, None]
    return list(zip(edges[:-1], edges[1:], strict=True))


class CustomerBaseRepository:
    def __init__(self, database: Database) -> None:
        self.database = database
        self.batch = SQLITE_BATCH if database.is_sqlite else POSTGRES_BATCH

    # --- runs ------------------------------------------------------------------------------

    async def add_run(self, row: CustomerRun) -> CustomerRun | None:
        """Insert a running run; None when another run of the segmentation is running."""
        async with self.database.sessionmaker() as session:
            session.add(row)
            try:
                await session.commit()
            except IntegrityError:
                await session.rollback()
                return None
        return row

    async def running(self, segmentation_id: int | None = None) -> Sequence[CustomerRun]:
        query = select(CustomerRun).where(CustomerRun.status == RUNNING)
        if segmentation_id is not None:
            query = query.where(CustomerRun.segmentation_id == segmentation_id)
        async with self.database.sessionmaker() as session:
            return (await session.execute(query)).scalars().all()

    async def fail(self, run: CustomerRun, error: dict[str, Any], error_status: int | None) -> bool:
        """Mark a running run failed, unless its worker spoke or finished it since `run` was read."""
        now = utcnow()
        beat = CustomerRun.heartbeat_at
        async with self.database.sessionmaker() as session:
            failed = await rows_updated(
                session,
                update(CustomerRun)
                .where(
                    CustomerRun.id == run.id,
                    CustomerRun.status == RUNNING,
                    beat.is_(None) if run.heartbeat_at is None else beat == run.heartbeat_at,
                )
                .values(status=FAILED, finished_at=now, error=error, error_status=error_status),
            )
            await session.commit()
        return bool(failed)

    async def fail_own(self, run_id: int, error: dict[str, Any], error_status: int | None) -> None:
        async with self.database.sessionmaker() as session:
            await session.execute(
                update(CustomerRun)
                .where(CustomerRun.id == run_id, CustomerRun.status == RUNNING)
                .values(status=FAILED, finished_at=utcnow(), error=error, error_status=error_status)
            )
            await session.commit()

    async def heartbeat(self, run_id: int) -> bool:
        """Say the run is alive; False when it is no longer running (failed by another worker)."""
        async with self.database.sessionmaker() as session:
            beat = await rows_updated(
                session,
                update(CustomerRun)
                .where(CustomerRun.id == run_id, CustomerRun.status == RUNNING)
                .values(heartbeat_at=utcnow()),
            )
            await session.commit()
        return bool(beat)

    async def set_customers(self, run_id: int, n_customers: int) -> None:
        async with self.database.sessionmaker() as session:
            await session.execute(update(CustomerRun).where(CustomerRun.id == run_id).values(n_customers=n_customers))
            await session.commit()

    async def current(self, segmentation_id: int) -> CustomerRun | None:
        """The latest completed run: its snapshot is the segmentation's base."""
        async with self.database.sessionmaker() as session:
            return await self._current(session, segmentation_id)

    async def _current(self, session: AsyncSession, segmentation_id: int) -> CustomerRun | None:
        return (
            await session.execute(
                select(CustomerRun)
                .where(CustomerRun.segmentation_id == segmentation_id, CustomerRun.status == COMPLETED)
                .order_by(CustomerRun.id.desc())
                .limit(1)
            )
        ).scalar_one_or_none()

    async def get(self, segmentation_id: int, run_id: int) -> CustomerRun | None:
        async with self.database.sessionmaker() as session:
            row = await session.get(CustomerRun, run_id)
        return row if row is not None and row.segmentation_id == segmentation_id else None

    async def page(self, segmentation_id: int, *, skip: int, limit: int) -> tuple[Sequence[CustomerRun], int]:
        mine = CustomerRun.segmentation_id == segmentation_id
        async with self.database.sessionmaker() as session:
            rows = (
                (
                    await session.execute(
                        select(CustomerRun).where(mine).order_by(CustomerRun.id.desc()).offset(skip).limit(limit)
                    )
                )
                .scalars()
                .all()
            )
            total = (await session.execute(select(func.count()).select_from(CustomerRun).where(mine))).scalar_one()
        return rows, int(total)

    # --- staging ---------------------------------------------------------------------------

    async def stage(self, run_id: int, scored: ScoredCustomers, beat: Callable[[], Awaitable[None]]) -> None:
        """The run's scored customers into `customer_staging`: COPY on PostgreSQL, batches on SQLite."""
        n = len(scored)
        for start in range(0, n, self.batch):
            rows = await run_in_threadpool(scored.rows, run_id, start, min(n, start + self.batch))
            async with self.database.engine.connect() as conn:
                if self.database.is_sqlite:
                    placeholders = ", ".join("?" for _ in STAGING_COLUMNS)
                    await conn.exec_driver_sql(
                        f"INSERT INTO customer_staging ({', '.join(STAGING_COLUMNS)}) VALUES ({placeholders})",
                        rows,  # type: ignore[arg-type]
                    )
                    await conn.commit()
                else:
                    raw = await conn.get_raw_connection()
                    driver: Any = raw.driver_connection
                    await driver.copy_records_to_table("customer_staging", records=rows, columns=STAGING_COLUMNS)
            await beat()

    # --- merging ---------------------------------------------------------------------------

    def merge_ranges(self, scored: ScoredCustomers) -> list[tuple[str | None, str | None]]:
        return boundaries(scored, SQLITE_BATCH) if self.database.is_sqlite else [(None, None)]

    async def merge(
        self,
        *,
        run_id: int,
        previous_run_id: int | None,
        replace: bool,
        model_version: str,
        ranges: list[tuple[str | None, str | None]],
        beat: Callable[[], Awaitable[None]],
    ) -> None:
        """Compare the staging with the base, range by range: the changes, and the run's own base."""
        previous = previous_run_id if previous_run_id is not None else -1
        if not self.database.is_sqlite:
            # Fresh statistics, so the planner joins a million staged rows by merge or hash.
            async with self.database.engine.connect() as conn:
                await conn.exec_driver_sql("ANALYZE customer_staging")
                await conn.exec_driver_sql("ANALYZE customer_memberships")
                await conn.commit()
        for lo, hi in ranges:
            values: dict[str, Any] = {"run": run_id, "prev": previous, "version": model_version}
            if lo is not None:
                values["lo"] = lo
            if hi is not None:
                values["hi"] = hi
            async with self.database.engine.connect() as conn:
                if not self.database.is_sqlite:
                    await conn.exec_driver_sql(f"SET LOCAL work_mem = '{POSTGRES_WORK_MEM}'")
                for statement in _merge_statements(
                    _range("s.customer_id", lo, hi), _range("p.customer_id", lo, hi), replace
                ):
                    await conn.execute(text(statement), values)
                await conn.commit()
            await beat()

    async def tally(self, run_id: int) -> list[tuple[str, str | None, str | None, int]]:
        """(change, from_segment_key, to_segment_key, customers) of a run's changes."""
        async with self.database.sessionmaker() as session:
            rows = await session.execute(
                select(
                    CustomerChange.change,
                    CustomerChange.from_segment_key,
                    CustomerChange.to_segment_key,
                    func.count(),
                )
                .where(CustomerChange.run_id == run_id)
                .group_by(CustomerChange.change, CustomerChange.from_segment_key, CustomerChange.to_segment_key)
            )
            return [(str(c), f, t, int(n)) for c, f, t, n in rows.all()]

    async def land(self, run_id: int, values: dict[str, Any], also: Landing | None) -> CustomerRun | None:
        """Mark the run completed (its base becomes the segmentation's), with `also` in the same
        transaction; None when it was no longer running (failed meanwhile by another worker)."""
        async with self.database.sessionmaker() as session:
            landed = await rows_updated(
                session,
                update(CustomerRun)
                .where(CustomerRun.id == run_id, CustomerRun.status == RUNNING)
                .values(status=COMPLETED, finished_at=utcnow(), **values),
            )
            if not landed:
                await session.rollback()
                return None
            run = await session.get(CustomerRun, run_id, populate_existing=True)
            assert run is not None
            if also is not None:
                await also(session, run)
            await session.commit()
        return run

    async def changes_in_order(self, session: AsyncSession, run_id: int, size: int) -> AsyncIterator[list[Any]]:
        """A run's changes by customer id, `size` at a time, read in `session` (the landing's)."""
        after: str | None = None
        while True:
            query = select(CustomerChange).where(CustomerChange.run_id == run_id)
            if after is not None:
                query = query.where(CustomerChange.customer_id > after)
            rows = (await session.execute(query.order_by(CustomerChange.customer_id).limit(size))).scalars().all()
            if not rows:
                return
            yield list(rows)
            if len(rows) < size:
                return
            after = rows[-1].customer_id

    # --- cleaning up -----------------------------------------------------------------------

    async def cleanup(self) -> int:
        """Remove what no reader needs: staging of runs not running, the bases of failed runs and of
        completed runs older than the last KEPT_SNAPSHOTS, the changes of failed runs. In batches."""
        async with self.database.sessionmaker() as session:
            runs = (
                await session.execute(select(CustomerRun.id, CustomerRun.segmentation_id, CustomerRun.status))
            ).all()
        kept: dict[int, list[int]] = {}
        for run_id, segmentation_id, status in sorted(runs, reverse=True):
            if status == COMPLETED:
                kept.setdefault(segmentation_id, [])
                if len(kept[segmentation_id]) < KEPT_SNAPSHOTS:
                    kept[segmentation_id].append(run_id)
        keep = {run_id for ids in kept.values() for run_id in ids}
        removed = 0
        for run_id, _, status in runs:
            if status != RUNNING:
                removed += await self._remove(CustomerStaging, run_id)
            if status == FAILED:
                removed += await self._remove(CustomerChange, run_id)
            if status != RUNNING and run_id not in keep:
                removed += await self._remove(CustomerMembership, run_id)
        return removed

    async def _remove(self, table: Any, run_id: int) -> int:
        removed = 0
        while True:
            async with self.database.sessionmaker() as session:
                batch = (
                    select(table.customer_id)
                    .where(table.run_id == run_id)
                    .order_by(table.customer_id)
                    .limit(CLEANUP_BATCH)
                    .scalar_subquery()
                )
                gone = await rows_updated(
                    session, delete(table).where(table.run_id == run_id, table.customer_id.in_(batch))
                )
                await session.commit()
            removed += gone
            if gone < CLEANUP_BATCH:
                return removed

    # --- reading ---------------------------------------------------------------------------

    async def customer(
        self, segmentation_id: int, customer_id: str, limit: int
    ) -> tuple[CustomerMembership | None, list[tuple[int, str | None, int | None]]]:
        """A customer's membership in the current base, and (run_id, to_segment_key, to_cluster_id) of its
        changes in completed runs, newest first: one connection, three indexed reads."""
        mine = (CustomerRun.segmentation_id == segmentation_id, CustomerRun.status == COMPLETED)
        async with self.database.sessionmaker() as session:
            current = (await session.execute(select(func.max(CustomerRun.id)).where(*mine))).scalar_one_or_none()
            if current is None:
                return None, []
            membership = await session.get(CustomerMembership, (current, customer_id))
            if membership is None:
                return None, []
            rows = await session.execute(
                select(CustomerChange.run_id, CustomerChange.to_segment_key, CustomerChange.to_cluster_id)
                .where(CustomerChange.run_id.in_(select(CustomerRun.id).where(*mine)))
                .where(CustomerChange.customer_id == customer_id)
                .order_by(CustomerChange.run_id.desc())
                .limit(limit)
            )
            return membership, [(int(r), k, c) for r, k, c in rows.all()]

    async def audience(
        self,
        run_id: int,
        segment_key: str,
        *,
        after: str | None,
        limit: int,
        min_p_alive: float | None = None,
        max_p_alive: float | None = None,
        min_clv: float | None = None,
    ) -> list[tuple[Any, ...]]:
        """(customer_id, confidence, since_run_id, p_alive, clv) of the segment's customers after `after`."""
        m = CustomerMembership
        where = [m.run_id == run_id, m.segment_key == segment_key]
        if after is not None:
            where.append(m.customer_id > after)
        if min_p_alive is not None:
            where.append(m.p_alive >= min_p_alive)
        if max_p_alive is not None:
            where.append(m.p_alive <= max_p_alive)
        if min_clv is not None:
            where.append(m.clv >= min_clv)
        async with self.database.engine.connect() as conn:
            rows = await conn.execute(
                select(m.customer_id, m.confidence, m.since_run_id, m.p_alive, m.clv)
                .where(and_(*where))
                .order_by(m.customer_id)
                .limit(limit)
            )
            return [tuple(row) for row in rows.all()]

    async def changes(self, run_id: int, *, after: str | None, limit: int) -> list[tuple[Any, ...]]:
        """(customer_id, change, from_cluster_id, to_cluster_id, from_segment_key, to_segment_key) after `after`."""
        c = CustomerChange
        where = [c.run_id == run_id]
        if after is not None:
            where.append(c.customer_id > after)
        async with self.database.engine.connect() as conn:
            rows = await conn.execute(
                select(
                    c.customer_id, c.change, c.from_cluster_id, c.to_cluster_id, c.from_segment_key, c.to_segment_key
                )
                .where(and_(*where))
                .order_by(c.customer_id)
                .limit(limit)
            )
            return [tuple(row) for row in rows.all()]


# Typed NULLs: PostgreSQL takes an untyped one in a SELECT list as text.
NULL_KEY = "CAST(NULL AS VARCHAR(64))"
NULL_INT = "CAST(NULL AS INTEGER)"
NULL_FLOAT = "CAST(NULL AS FLOAT)"


def _merge_statements(staged: str, previous: str, replace: bool) -> list[str]:
    """The statements that merge one range of ids: changes, then the run's base, then its staging gone."""
    absent = "NOT EXISTS (SELECT 1 FROM customer_staging s WHERE s.run_id = :run AND s.customer_id = p.customer_id)"
    statements = [
        f"""INSERT INTO customer_changes
            (run_id, customer_id, change, from_segment_key, to_segment_key, from_cluster_id, to_cluster_id)
        SELECT CAST(:run AS INTEGER), s.customer_id,
            CASE WHEN p.status = '{ACTIVE}' THEN 'changed' ELSE 'new' END,
            CASE WHEN p.status = '{ACTIVE}' THEN p.segment_key END, s.segment_key,
            CASE WHEN p.status = '{ACTIVE}' THEN p.cluster_id END, s.cluster_id
        FROM customer_staging s
        LEFT JOIN customer_memberships p ON p.run_id = CAST(:prev AS INTEGER) AND p.customer_id = s.customer_id
        WHERE s.run_id = :run AND {staged}
            AND (p.customer_id IS NULL OR p.status <> '{ACTIVE}' OR p.segment_key <> s.segment_key)""",
        f"""INSERT INTO customer_memberships
            (run_id, customer_id, status, segment_key, cluster_id, confidence, model_version, since_run_id, p_alive, clv)
        SELECT CAST(:run AS INTEGER), s.customer_id, '{ACTIVE}', s.segment_key, s.cluster_id, s.confidence, CAST(:version AS VARCHAR(64)),
            CASE WHEN p.status = '{ACTIVE}' AND p.segment_key = s.segment_key THEN p.since_run_id ELSE CAST(:run AS INTEGER) END,
            s.p_alive, s.clv
        FROM customer_staging s
        LEFT JOIN customer_memberships p ON p.run_id = CAST(:prev AS INTEGER) AND p.customer_id = s.customer_id
        WHERE s.run_id = :run AND {staged}""",
    ]
    if replace:
        statements += [
            f"""INSERT INTO customer_changes
                (run_id, customer_id, change, from_segment_key, to_segment_key, from_cluster_id, to_cluster_id)
            SELECT CAST(:run AS INTEGER), p.customer_id, '{GONE}', p.segment_key, {NULL_KEY}, p.cluster_id, {NULL_INT}
            FROM customer_memberships p
            WHERE p.run_id = CAST(:prev AS INTEGER) AND p.status = '{ACTIVE}' AND {previous} AND {absent}""",
            f"""INSERT INTO customer_memberships
                (run_id, customer_id, status, segment_key, cluster_id, confidence, model_version, since_run_id,
                 p_alive, clv)
            SELECT CAST(:run AS INTEGER), p.customer_id, '{GONE}', {NULL_KEY}, {NULL_INT}, {NULL_FLOAT}, {NULL_KEY},
                CASE WHEN p.status = '{GONE}' THEN p.since_run_id ELSE CAST(:run AS INTEGER) END, {NULL_FLOAT}, {NULL_FLOAT}
            FROM customer_memberships p
            WHERE p.run_id = CAST(:prev AS INTEGER) AND {previous} AND {absent}""",
        ]
    else:
        statements.append(
            f"""INSERT INTO customer_memberships
                (run_id, customer_id, status, segment_key, cluster_id, confidence, model_version, since_run_id,
                 p_alive, clv)
            SELECT CAST(:run AS INTEGER), p.customer_id, p.status, p.segment_key, p.cluster_id, p.confidence, p.model_version,
                p.since_run_id, p.p_alive, p.clv
            FROM customer_memberships p
            WHERE p.run_id = CAST(:prev AS INTEGER) AND {previous} AND {absent}"""
        )
    statements.append(f"DELETE FROM customer_staging WHERE run_id = :run AND {staged.replace('s.', '')}")
    return statements


# --- what other domains ask of the base ---------------------------------------------------------


async def references_version(session: AsyncSession, segmentation_id: int, version: str) -> bool:
    """Whether a run of the segmentation (and so its base) references `version`."""
    found = await session.execute(
        select(CustomerRun.id)
        .where(CustomerRun.segmentation_id == segmentation_id, CustomerRun.model_version == version)
        .limit(1)
    )
    return found.first() is not None


async def has_running_run(session: AsyncSession, segmentation_id: int) -> bool:
    found = await session.execute(
        select(CustomerRun.id)
        .where(CustomerRun.segmentation_id == segmentation_id, CustomerRun.status == RUNNING)
        .limit(1)
    )
    return found.first() is not None


async def delete_base(session: AsyncSession, segmentation_id: int) -> None:
    """Delete a segmentation's base, runs, staging and changes (in the caller's transaction)."""
    runs = select(CustomerRun.id).where(CustomerRun.segmentation_id == segmentation_id)
    for table in (CustomerMembership, CustomerChange, CustomerStaging):
        await session.execute(delete(table).where(table.run_id.in_(runs)))
    await session.execute(delete(CustomerRun).where(CustomerRun.segmentation_id == segmentation_id))


def stale_before(seconds: float) -> Any:
    return utcnow() - timedelta(seconds=seconds)
