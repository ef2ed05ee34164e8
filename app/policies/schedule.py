"""When a policy's schedule is due: five-field cron expressions in UTC, read by croniter.

A schedule fires at its first occurrence after the last fire (or after the policy was set); all
the occurrences missed while the service was down coalesce into that one fire, and the next one
is the first occurrence after the moment it fired.
"""

from __future__ import annotations

from datetime import UTC, datetime

from croniter import croniter

from app.core.errors import InvalidInput


def checked(expression: str) -> str:
    """A cron expression of five fields (minute hour day month weekday), or a 422 saying why not."""
    text = " ".join(expression.split())
    if len(text.split(" ")) != 5 or not croniter.is_valid(text):
        raise InvalidInput(f"`schedule` must be a five-field cron expression in UTC, like '0 3 1 * *': {expression!r}")
    return text


def next_fire(expression: str, after: datetime) -> datetime:
    """The first occurrence strictly after `after` (UTC)."""
    start = after.astimezone(UTC) if after.tzinfo else after.replace(tzinfo=UTC)
    return croniter(expression, start).get_next(datetime).astimezone(UTC)


def is_due(expression: str, *, since: datetime, now: datetime) -> bool:
    """Whether an occurrence fell in (since, now]: the missed ones count once."""
    return next_fire(expression, since) <= now
