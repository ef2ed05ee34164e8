"""The JSON of history pages, written straight from their rows (tests/test_history_page.py holds it
equal to HistoryPage's own serialization)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any


def _timestamp(value: datetime | str) -> str:
    """ISO 8601 in UTC as Pydantic writes it (`Z`, no fraction when it is zero)."""
    if isinstance(value, str):
        if len(value) == 26 and value[10] == " " and value[19] == ".":  # SQLite's "YYYY-MM-DD HH:MM:SS.ffffff"
            return f"{value[:10]}T{value[11:19] if value.endswith('.000000') else value[11:]}Z"
        value = datetime.fromisoformat(value)
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat() + "Z"


def item_json(row: Sequence[Any], quoted: dict[str | None, str]) -> str:
    """One HistoryItem as JSON from its row (id, customer_data, ..., created_at, segmentation).

    The stored customer JSON is copied as it is; `quoted` keeps names and versions already
    quoted (they repeat from row to row); SQLite's timestamps are reshaped by slicing.
    """
    row_id, customer, cluster, name, confidence, version, created, segmentation = row
    name_json = quoted.get(name)
    if name_json is None:
        name_json = quoted[name] = json.dumps(name)
    version_json = quoted.get(version)
    if version_json is None:
        version_json = quoted[version] = json.dumps(version)
    segmentation_json = quoted.get(segmentation)
    if segmentation_json is None:
        segmentation_json = quoted[segmentation] = json.dumps(segmentation)
    if isinstance(created, str) and len(created) == 26:  # SQLite's "YYYY-MM-DD HH:MM:SS.ffffff"
        stamp = created[:10] + "T" + created[11:19] if created.endswith(".000000") else created.replace(" ", "T")
    else:
        stamp = _timestamp(created)[:-1]
    return (
        f'{{"id":{row_id},"customer_data":{customer},"cluster":{cluster},"cluster_name":{name_json},'
        f'"confidence":{confidence!r},"model_version":{version_json},"created_at":"{stamp}Z",'
        f'"segmentation":{segmentation_json}}}'
    )


def page_bytes(items: Iterable[str], *, total: int, skip: int, limit: int, next_before_id: int | None) -> bytes:
    """A HistoryPage as JSON from its items' JSON."""
    after = "null" if next_before_id is None else str(int(next_before_id))
    return (
        f'{{"history":[{",".join(items)}],"total":{total},"skip":{skip},"limit":{limit},"next_before_id":{after}}}'
    ).encode()


def page_json(
    rows: Sequence[Sequence[Any]], *, total: int, skip: int, limit: int, next_before_id: int | None = None
) -> bytes:
    """A HistoryPage as JSON, written straight from the page's rows (id, customer_data, ..., created_at).

    What the history repositories send, from kept rows or fresh ones; tests/test_history_page.py
    holds it equal to HistoryPage's own serialization.
    """
    quoted: dict[str | None, str] = {}
    items = [item_json(row, quoted) for row in rows]
    return page_bytes(items, total=total, skip=skip, limit=limit, next_before_id=next_before_id)
