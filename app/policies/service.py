"""Retraining policies: a schedule, a drift trigger or a manual trigger fires a candidate training on the
policy's source; the gate (app.policies.gate) decides whether it becomes the active version.

A fire is a training job (app.jobs, 202): it reads the source once (app.sources.reading), trains a
candidate recorded inactive (app.versions.activation.held) with the active version's choice of k,
compares both on the source's data, then activates it (`model.activated`, by the policy) or keeps
it inactive (`model.held`), and records a policy event with its figures and reasons. After an
activation, `then_run` starts a run of the customer base on the same source.

Exactly one worker fires a due trigger: a schedule is claimed by an UPDATE that moves the policy's
`since` from the value the worker read to now, and only one such UPDATE can succeed; occurrences
missed while the service was down fall between `since` and now, so they coalesce into one fire. A
drift trigger is claimed the same way on `drift_fired_at`, after its cooldown.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy import delete, func, select, update
from starlette.concurrency import run_in_threadpool

from app.core.errors import AppError, Conflict, NotFound, ml_error_body
from app.core.events import EventSink
from app.core.tables import TrainingJob, utcnow
from app.jobs.repository import job_body
from app.ml.errors import MLError
from app.policies import gate as gates
from app.policies.schedule import checked, is_due, next_fire
from app.policies.schemas import FireResult, PolicyBody
from app.policies.tables import PolicyEvent, RetrainingPolicy
from app.segmentations.kinds.registry import kind_of
from app.sources.reading import load_source, open_source
from app.versions import progress
from app.versions.activation import Actor, acting_as, held
from app.versions.lease import rows_updated
from app.versions.training import TrainingRequest

if TYPE_CHECKING:
    from app.core.config import Settings
    from app.core.database import Database
    from app.core.metrics import Metrics
    from app.customers.service import CustomerBase
    from app.jobs.service import JobRunner
    from app.segmentations.registry import SegmentationRegistry
    from app.versions.store import ModelStore

logger = logging.getLogger("app.policies")

NO_ACTIVE = "no active version"
HOLD_ASKED = "on_pass is hold: the candidate passed the gate and waits to be activated by hand"
TRAINING_RUNNING = "a training of this segmentation was running when the trigger came"
FIRE_STOPPED = "the worker carrying out the fire stopped before it finished"
FIRE_CANCELLED = "the fire's job was cancelled before it finished"
DRIFT_LEVELS = {"stable": 0, "moderate": 1, "significant": 2}
RUN_WAIT_SECONDS = 600.0


def policy_body(row: RetrainingPolicy, name: str) -> dict[str, Any]:
    return {
        "segmentation": name,
        "source": row.source,
        "schedule": row.schedule,
        "on_drift": row.on_drift,
        "gate": row.gate,
        "on_pass": row.on_pass,
        "then_run": row.then_run,
        "updated_at": row.updated_at,
        "next_fire_at": row.next_fire_at,
        "last_fired_at": row.last_fired_at,
        "last_outcome": row.last_outcome,
    }


def event_body(row: PolicyEvent) -> dict[str, Any]:
    return {
        "at": row.at,
        "trigger": row.trigger,
        "model_version": row.model_version,
        "outcome": row.outcome,
        "reasons": list(row.reasons or []),
        "figures": dict(row.figures or {}),
        "job_id": row.job_id,
    }


@dataclass(frozen=True)
class Fire:
    """One trigger of a policy, as the job that carries it out sees it (a Trainer for app.jobs)."""

    service: PolicyService
    trigger: str
    policy: dict[str, Any]

    def check(self, store: ModelStore, request: TrainingRequest, *, has_file: bool) -> None:
        return None  # the policy was checked when it was set; its source is read by the job

    async def train(self, store: ModelStore, upload: IO[bytes] | None, request: TrainingRequest) -> dict[str, Any]:
        return await self.service.carry_out(store, self.trigger, self.policy, request)


class PolicyService:
    def __init__(
        self,
        *,
        settings: Settings,
        database: Database,
        registry: SegmentationRegistry,
        jobs: JobRunner,
        customers: CustomerBase | None,
        events: EventSink | None,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.settings = settings
        self.database = database
        self.registry = registry
        self.jobs = jobs
        self.customers = customers
        self.events = events
        self._task: asyncio.Task | None = None

    # --- the clock ----------------------------------------------------------------------------

    def now(self) -> datetime:
        """The scheduler's clock: the real one, or in a test configuration the time its file holds."""
        path = self.settings.test_scheduler_clock_file
        if self.settings.testing and path is not None and path.exists():
            text = path.read_text().strip()
            if text:
                moment = datetime.fromisoformat(text)
                return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        return utcnow()

    # --- the policy ---------------------------------------------------------------------------

    async def put(self, store: ModelStore, body: PolicyBody, *, by: str) -> dict[str, Any]:
        await load_source(self.database, body.source)  # 404 for an unknown source
        schedule = checked(body.schedule) if body.schedule is not None else None
        now = self.now()
        values = {
            "source": body.source,
            "schedule": schedule,
            "on_drift": body.on_drift,
            "gate": body.gate.model_dump(),
            "on_pass": body.on_pass,
            "then_run": body.then_run,
            "created_by": by,
            "updated_at": utcnow(),
            "since": now,
            "next_fire_at": next_fire(schedule, now) if schedule else None,
        }
        info = store.segmentation
        async with self.database.sessionmaker() as session:
            row = await session.get(RetrainingPolicy, info.id)
            if row is None:
                row = RetrainingPolicy(segmentation_id=info.id, **values)
                session.add(row)
            else:
                for key, value in values.items():
                    setattr(row, key, value)
            await session.commit()
            await session.refresh(row)
        logger.info("retraining policy of %s set by %s", info.name, by)
        return policy_body(row, info.name)

    async def _row(self, store: ModelStore) -> RetrainingPolicy:
        async with self.database.sessionmaker() as session:
            row = await session.get(RetrainingPolicy, store.segmentation.id)
        if row is None:
            raise NotFound("retraining policy")
        return row

    async def get(self, store: ModelStore) -> dict[str, Any]:
        return policy_body(await self._row(store), store.segmentation.name)

    async def delete(self, store: ModelStore) -> None:
        async with self.database.sessionmaker() as session:
            gone = await rows_updated(
                session, delete(RetrainingPolicy).where(RetrainingPolicy.segmentation_id == store.segmentation.id)
            )
            if not gone:
                raise NotFound("retraining policy")
            await session.commit()

    async def events_page(self, store: ModelStore, *, skip: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        mine = PolicyEvent.segmentation_id == store.segmentation.id
        async with self.database.sessionmaker() as session:
            total = (await session.execute(select(func.count()).select_from(PolicyEvent).where(mine))).scalar_one()
            rows = (
                await session.execute(
                    select(PolicyEvent)
                    .where(mine)
                    .order_by(PolicyEvent.at.desc(), PolicyEvent.id.desc())
                    .offset(skip)
                    .limit(limit)
                )
            ).scalars()
            return [event_body(row) for row in rows], int(total)

    # --- firing -------------------------------------------------------------------------------

    async def trigger(self, store: ModelStore, *, by: str) -> dict[str, Any]:
        """POST .../policy/trigger: fire it now (a job)."""
        row = await self._row(store)
        return await self.fire(store, "manual", row, by=by)

    async def fire(self, store: ModelStore, trigger: str, row: RetrainingPolicy, *, by: str) -> dict[str, Any]:
        """Start the job that carries out one trigger; with a training running, a failed event (and job)."""
        policy = policy_body(row, store.segmentation.name)
        request = TrainingRequest(n_clusters=None, random_state=42, as_of=None, by=by)
        try:
            return await self.jobs.submit(
                store,
                upload=None,
                filename=None,
                request=request,
                result_model=FireResult,
                trainer=Fire(self, trigger, policy),
                parameters={"policy_trigger": trigger},
            )
        except Conflict:
            job_id = secrets.token_hex(8)
            await self._record(store, trigger, None, "failed", [TRAINING_RUNNING], {}, job_id=job_id)
            now = utcnow()
            failed = TrainingJob(
                id=job_id,
                segmentation_id=store.segmentation.id,
                segmentation=store.segmentation.name,
                state="failed",
                phase="done",
                fraction=None,
                phases=[],
                parameters={"policy_trigger": trigger},
                cancel_requested=False,
                created_by=by,
                created_at=now,
                started_at=now,
                finished_at=now,
                result=None,
                error={"detail": TRAINING_RUNNING},
                error_status=409,
            )
            await self.jobs.rows.add(failed)
            return job_body(failed)

    async def carry_out(
        self, store: ModelStore, trigger: str, policy: dict[str, Any], request: TrainingRequest
    ) -> dict[str, Any]:
        """The job's work: train a candidate on the source, judge it, activate or hold it, then run."""
        active = store.current
        version: str | None = None
        figures: dict[str, Any] = {}
        reasons: list[str] = []
        outcome = "failed"
        actor = Actor(type="policy", id=store.segmentation.id, name=f"policy of {store.segmentation.name}")
        kind = kind_of(store.segmentation)
        job = progress.current_job.get()
        job_id = getattr(job, "id", None)
        try:
            async with open_source(self.database, self.settings, policy["source"]) as data:
                k = _active_k(active)
                with held():
                    candidate = await kind.train(
                        store,
                        data.file,
                        settings=self.settings,
                        n_clusters=k,
                        random_state=request.random_state,
                        by=actor.name or "policy",
                        as_of=None,
                    )
                version = candidate.version
                if active is None:
                    reasons = [NO_ACTIVE]
                    passed = True
                else:
                    data.file.seek(0)
                    compared = await kind.comparison_data(store, data.file, settings=self.settings)
                    figures = await run_in_threadpool(gates.figures, active.model, candidate.model, compared)
                    reasons = gates.Gate(**policy["gate"]).judge(figures)
                    passed = not reasons
                if passed and policy["on_pass"] == "activate":
                    with acting_as(actor):
                        await store.activate(version, by=actor)
                    outcome = "activated"
                    if policy["then_run"]:
                        data.file.seek(0)
                        await self._then_run(store, data.file, policy["source"])
                else:
                    if passed:
                        reasons = [*reasons, HOLD_ASKED]
                    outcome = "held"
        except AppError as exc:
            reasons = [*reasons, str(exc.body().get("detail", exc.message))]
        except MLError as exc:
            reasons = [*reasons, str(ml_error_body(exc).get("detail"))]
        except asyncio.CancelledError:  # cancelled by hand, or this worker stops: the event says so
            stopped = FIRE_CANCELLED if getattr(job, "stop_reason", None) == "cancelled" else FIRE_STOPPED
            landed = "activated" if outcome == "activated" else "failed"
            await self._record(store, trigger, version, landed, [*reasons, stopped], figures, job_id=job_id)
            raise
        await self._record(store, trigger, version, outcome, reasons, figures, job_id=job_id)
        return {"outcome": outcome, "model_version": version, "reasons": reasons, "figures": figures}

    async def _then_run(self, store: ModelStore, upload: IO[bytes], source: str) -> None:
        """A run of the customer base on the source; a run in progress is waited for first."""
        if self.customers is None:
            return
        from app.customers.service import RunRequest

        request = RunRequest(mode="replace", as_of=None, by="policy", filename=f"source {source}")
        deadline = asyncio.get_running_loop().time() + RUN_WAIT_SECONDS
        while True:
            try:
                await self.customers.submit(store, upload=upload, request=request)
                return
            except Conflict:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                upload.seek(0)
                await asyncio.sleep(1.0)

    async def _record(
        self,
        store: ModelStore,
        trigger: str,
        version: str | None,
        outcome: str,
        reasons: Sequence[str],
        figures: dict[str, Any],
        *,
        job_id: str | None = None,
    ) -> None:
        """The policy event, the policy's last outcome and (held) `model.held`, in one transaction."""
        info = store.segmentation
        async with self.database.sessionmaker() as session:
            session.add(
                PolicyEvent(
                    segmentation_id=info.id,
                    at=utcnow(),
                    trigger=trigger,
                    model_version=version,
                    outcome=outcome,
                    reasons=list(reasons),
                    figures=figures,
                    job_id=job_id,
                )
            )
            await session.execute(
                update(RetrainingPolicy)
                .where(RetrainingPolicy.segmentation_id == info.id)
                .values(last_outcome=outcome, last_fired_at=utcnow())
            )
            if outcome == "held" and self.events is not None:
                data = {
                    "segmentation": info.name,
                    "model_version": version,
                    "gate_passed": HOLD_ASKED in reasons,
                    "reasons": list(reasons),
                    "figures": figures,
                }
                await self.events.add(session, "model.held", data, segmentation_id=info.id)
            await session.commit()
        logger.info("policy of %s (%s trigger): %s %s", info.name, trigger, outcome, "; ".join(reasons))

    async def job_settled(self, row: TrainingJob) -> None:
        """A job failed because its worker was gone (app.jobs' on_settled): a fire it carried out
        gets its failed event, unless the fire recorded its own before the worker went."""
        trigger = (row.parameters or {}).get("policy_trigger")
        store = self._store_of(row.segmentation_id) if trigger else None
        if store is None:
            return
        async with self.database.sessionmaker() as session:
            seen = (
                await session.execute(select(func.count()).select_from(PolicyEvent).where(PolicyEvent.job_id == row.id))
            ).scalar_one()
        if not seen:
            await self._record(store, str(trigger), None, "failed", [FIRE_STOPPED], {}, job_id=row.id)

    # --- the scheduler ------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="policy-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        await asyncio.sleep(0)  # a due schedule fires right at start: missed occurrences coalesce into it
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup: the next tick tries again
                logger.warning("policy scheduler tick failed", exc_info=True)
            await asyncio.sleep(self.settings.policy_tick_seconds)

    async def tick(self) -> int:
        """Fire every due schedule this worker claims; how many it fired."""
        now = self.now()
        async with self.database.sessionmaker() as session:
            every = list((await session.execute(select(RetrainingPolicy))).scalars())
        self._gauges(every)
        rows = [row for row in every if row.schedule is not None]
        fired = 0
        for row in rows:
            assert row.schedule is not None
            if not is_due(row.schedule, since=row.since, now=now):
                continue
            if not await self._claim(RetrainingPolicy.since, row.since, row, now, next_fire(row.schedule, now)):
                continue  # another worker fired it
            store = self._store_of(row.segmentation_id)
            if store is not None:
                await self.fire(store, "schedule", row, by="policy")
                fired += 1
        return fired

    def _gauges(self, rows: Sequence[RetrainingPolicy]) -> None:
        if self.metrics is None:
            return
        names = {s.segmentation.id: s.segmentation.name for s in self.registry.stores()}
        self.metrics.set_policies(
            [
                (
                    names[row.segmentation_id],
                    row.last_outcome,
                    row.next_fire_at.timestamp() if row.next_fire_at else None,
                )
                for row in rows
                if row.segmentation_id in names
            ]
        )

    async def _claim(
        self, column: Any, seen: datetime | None, row: RetrainingPolicy, now: datetime, next_at: datetime | None
    ) -> bool:
        values: dict[str, Any] = (
            {"since": now, "next_fire_at": next_at} if column is RetrainingPolicy.since else {"drift_fired_at": now}
        )
        condition = column.is_(None) if seen is None else column == seen
        async with self.database.sessionmaker() as session:
            won = await rows_updated(
                session,
                update(RetrainingPolicy)
                .where(RetrainingPolicy.segmentation_id == row.segmentation_id, condition)
                .values(**values),
            )
            await session.commit()
        return bool(won)

    def _store_of(self, segmentation_id: int) -> ModelStore | None:
        return next((s for s in self.registry.stores() if s.segmentation.id == segmentation_id), None)

    async def drift_moved(self, store: ModelStore, before: str, after: str) -> None:
        """Called by the drift watch when a status moves: fire a policy whose `on_drift` it moved into."""
        async with self.database.sessionmaker() as session:
            row = await session.get(RetrainingPolicy, store.segmentation.id)
        if row is None or row.on_drift is None:
            return
        level = DRIFT_LEVELS[row.on_drift]
        if not (DRIFT_LEVELS.get(after, 0) >= level > DRIFT_LEVELS.get(before, 0)):
            return
        now = self.now()
        cooldown = timedelta(hours=self.settings.drift_retrain_cooldown_hours)
        if row.drift_fired_at is not None and row.drift_fired_at + cooldown > now:
            logger.info("drift of %s moved to %s within the retraining cooldown", store.segmentation.name, after)
            return
        if await self._claim(RetrainingPolicy.drift_fired_at, row.drift_fired_at, row, now, None):
            await self.fire(store, "drift", row, by="policy")


def _active_k(active: Any) -> int | None:
    """The active version's k when it was asked for; None (chosen automatically) otherwise or without one."""
    if active is None:
        return None
    selection = active.metadata.get("k_selection") or {}
    if selection.get("method") == "fixed":
        return int(selection.get("requested_k") or active.metadata["n_clusters"])
    return None
