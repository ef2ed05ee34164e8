"""The `training_jobs` table: every worker's jobs, their heartbeats, outcomes and cancels, as SQL.

app.jobs.service runs the jobs; this module only reads and writes their rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update

from app.core.database import Database
from app.core.errors import NotFound
from app.core.tables import TrainingJob, utcnow
from app.versions.lease import rows_updated

LIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "cancelled")
WORKER_STOPPED = "The worker running it stopped before it finished; the active version is unchanged"


def stamp(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def job_body(row: TrainingJob) -> dict[str, Any]:
    """A job as GET /jobs/{id} shows it."""
    return {
        "job_id": row.id,
        "state": row.state,
        "segmentation": row.segmentation,
        "created_at": row.created_at,
        "created_by": row.created_by,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
        "progress": {"phase": row.phase, "fraction": row.fraction, "phases": list(row.phases or [])},
        "parameters": dict(row.parameters or {}),
        "cancel_requested": bool(row.cancel_requested),
        "result": row.result,
        "error": row.error,
        "error_status": row.error_status,
        "worker": row.worker,
        "heartbeat_at": row.heartbeat_at,
    }


class JobRepository:
    """Rows of `training_jobs`; each method is one short transaction."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def add(self, row: TrainingJob) -> None:
        async with self.database.sessionmaker() as session:
            session.add(row)
            await session.commit()

    async def queued(self, job_id: str, *, phases: list[dict[str, Any]], parameters: dict[str, Any]) -> TrainingJob:
        """The job's upload is kept: its row shows it queued, with the upload's size among its parameters."""
        async with self.database.sessionmaker() as session:
            await session.execute(
                update(TrainingJob)
                .where(TrainingJob.id == job_id)
                .values(phase="queued", phases=phases, parameters=parameters)
            )
            await session.commit()
            stored = await session.get(TrainingJob, job_id, populate_existing=True)
        if stored is None:
            raise NotFound("training job")
        return stored

    async def remove(self, job_id: str) -> None:
        async with self.database.sessionmaker() as session:
            await session.execute(delete(TrainingJob).where(TrainingJob.id == job_id))
            await session.commit()

    async def running(self, job_id: str, *, phase: str, phases: list[dict[str, Any]]) -> None:
        async with self.database.sessionmaker() as session:
            await session.execute(
                update(TrainingJob)
                .where(TrainingJob.id == job_id, TrainingJob.state.in_(LIVE))
                .values(state="running", started_at=utcnow(), phase=phase, phases=phases)
            )
            await session.commit()

    async def heartbeat(
        self, job_id: str, *, phase: str, phases: list[dict[str, Any]], fraction: float | None
    ) -> tuple[bool, bool]:
        """Write the job's progress; returns (still live, cancel asked)."""
        async with self.database.sessionmaker() as session:
            updated = await rows_updated(
                session,
                update(TrainingJob)
                .where(TrainingJob.id == job_id, TrainingJob.state.in_(LIVE))
                .values(heartbeat_at=utcnow(), phase=phase, phases=phases, fraction=fraction),
            )
            await session.commit()
            cancel = (
                await session.execute(select(TrainingJob.cancel_requested).where(TrainingJob.id == job_id))
            ).scalar_one_or_none()
        return updated > 0, bool(cancel)

    async def finish(
        self,
        job_id: str,
        *,
        state: str,
        phases: list[dict[str, Any]],
        result: dict[str, Any] | None,
        error: dict[str, Any] | None,
        error_status: int | None,
    ) -> None:
        now = utcnow()
        async with self.database.sessionmaker() as session:
            await session.execute(
                update(TrainingJob)
                .where(TrainingJob.id == job_id, TrainingJob.state.in_(LIVE))
                .values(
                    state=state,
                    phase=state,
                    phases=phases,
                    fraction=1.0 if state == "succeeded" else None,
                    finished_at=now,
                    heartbeat_at=now,
                    result=result,
                    error=error,
                    error_status=error_status,
                )
            )
            await session.commit()

    async def fail_stale(self, row: TrainingJob) -> bool:
        """Mark a stale job failed, unless its worker spoke or finished it since `row` was read."""
        now = utcnow()
        phases = [*(row.phases or []), {"phase": "failed", "at": stamp(now)}]
        async with self.database.sessionmaker() as session:
            settled = await rows_updated(
                session,
                update(TrainingJob)
                .where(
                    TrainingJob.id == row.id,
                    TrainingJob.state.in_(LIVE),
                    TrainingJob.worker == row.worker,
                    TrainingJob.heartbeat_at.is_(None)
                    if row.heartbeat_at is None
                    else TrainingJob.heartbeat_at == row.heartbeat_at,
                )
                .values(
                    state="failed",
                    phase="failed",
                    phases=phases,
                    fraction=None,
                    finished_at=now,
                    error={"detail": WORKER_STOPPED},
                    error_status=None,
                ),
            )
            await session.commit()
        return bool(settled)

    async def ask_cancel(self, job_id: str) -> bool:
        async with self.database.sessionmaker() as session:
            asked = await rows_updated(
                session,
                update(TrainingJob)
                .where(TrainingJob.id == job_id, TrainingJob.state.in_(LIVE))
                .values(cancel_requested=True),
            )
            await session.commit()
        return bool(asked)

    async def get(self, job_id: str) -> TrainingJob:
        async with self.database.sessionmaker() as session:
            row = await session.get(TrainingJob, job_id)
        if row is None:
            raise NotFound("training job")
        return row

    async def live(self) -> Sequence[TrainingJob]:
        async with self.database.sessionmaker() as session:
            return (await session.execute(select(TrainingJob).where(TrainingJob.state.in_(LIVE)))).scalars().all()

    async def page(
        self, *, skip: int, limit: int, segmentation_id: int | None = None, state: str | None = None
    ) -> tuple[Sequence[TrainingJob], int]:
        """Jobs newest first (of one segmentation, in one state) and how many match."""
        where = []
        if segmentation_id is not None:
            where.append(TrainingJob.segmentation_id == segmentation_id)
        if state is not None:
            where.append(TrainingJob.state == state)
        query = (
            select(TrainingJob)
            .where(*where)
            .order_by(TrainingJob.created_at.desc(), TrainingJob.id.desc())
            .offset(skip)
            .limit(limit)
        )
        async with self.database.sessionmaker() as session:
            rows = (await session.execute(query)).scalars().all()
            total = (await session.execute(select(func.count()).select_from(TrainingJob).where(*where))).scalar_one()
        return rows, int(total)
