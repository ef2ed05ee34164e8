"""What a training running as a job tells its job while it runs: its phase, and the training it reserved.

A job (app.jobs.service) sets `current_job` in its own task, so everything the training calls
(reading, fitting, recording) can report its phase without every signature on the way carrying
it. Outside a job `current_job` is None and reporting does nothing.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Protocol


class TrainingReport(Protocol):
    """The job's side: where phases go, and the training reservation a job took before it answered 202."""

    reservation: Any

    def phase(self, name: str) -> None: ...


current_job: ContextVar[TrainingReport | None] = ContextVar("current_job", default=None)


def phase(name: str) -> None:
    """The training running in this task entered phase `name` (reading, fitting, recording)."""
    job = current_job.get()
    if job is not None:
        job.phase(name)


def reservation() -> Any:
    """The training reservation the job running in this task already holds, if any."""
    job = current_job.get()
    return job.reservation if job is not None else None
