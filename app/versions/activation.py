"""Who makes a version active, as `model.activated` names it: `{type: user or policy, id, name}`.

An activation route passes its caller down. A training reaches the repository through its kind's
code and, with `wait=false`, through a job's task: the route sets `acting` for it instead, and the
job's task, created within the request, inherits it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, Protocol


class _User(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def username(self) -> str: ...


@dataclass(frozen=True)
class Actor:
    type: Literal["user", "policy"]
    id: int | str | None
    name: str | None

    @classmethod
    def user(cls, user: _User) -> Actor:
        return cls(type="user", id=user.id, name=user.username)

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "id": self.id, "name": self.name}


acting: ContextVar[Actor | None] = ContextVar("acting", default=None)


@contextmanager
def acting_as(actor: Actor) -> Iterator[None]:
    token = acting.set(actor)
    try:
        yield
    finally:
        acting.reset(token)


holding: ContextVar[bool] = ContextVar("holding", default=False)
"""Set while a retraining policy trains its candidate: the new version is recorded inactive."""


@contextmanager
def held() -> Iterator[None]:
    """Record the versions trained within as inactive candidates (app.policies decides on them)."""
    token = holding.set(True)
    try:
        yield
    finally:
        holding.reset(token)
