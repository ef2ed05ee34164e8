"""A fourth segmentation kind, added the way the README's "Layout" says: one class, one registry line.

`WebKind` segments website visitors on three fixed columns. It is written here as a new module
would be, registered in `KINDS` for the test only, and then driven through HTTP like any other kind:
declared, trained on an upload, asked for one visitor and for a batch, listed and compared. Nothing
outside its class knows its name, so every route works for it unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest

from app.core.errors import InvalidInput
from app.ml.schema import FeatureSchema
from app.segmentations.kinds import registry
from app.segmentations.kinds.custom import CustomKind
from app.versions.store import SegmentationInfo

pytestmark = pytest.mark.postgres

WEB_FEATURES = [
    {"name": "sessions", "type": "numeric", "min": 0},
    {"name": "pages_per_session", "type": "numeric", "min": 0},
    {"name": "device", "type": "categorical"},
]


class WebKind(CustomKind):
    """Website visitors: their sessions, pages per session and device; nothing to declare."""

    name: ClassVar[str] = "web"
    description: ClassVar[str] = "website visitors: sessions, pages per session, device"
    training_file: ClassVar[str] = "a CSV of visitors"

    def declare(
        self, *, features: list[dict[str, Any]] | None, id_column: str | None, columns: dict[str, Any] | None
    ) -> dict[str, Any]:
        if features or columns is not None:
            raise InvalidInput("A segmentation of kind web has its own columns: leave `features` and `columns` out")
        return FeatureSchema.declare(WEB_FEATURES, id_column=id_column or "visitor_id").to_dict()

    def public(self, info: SegmentationInfo) -> dict[str, Any]:
        return {}


@pytest.fixture
def web_kind(monkeypatch) -> WebKind:
    kind = WebKind()
    monkeypatch.setitem(registry.KINDS, kind.name, kind)  # the one registry line
    return kind


def visitors(rows: int = 450, seed: int = 5) -> pd.DataFrame:
    """Three planted kinds of visitor: rare browsers on mobile, steady readers, heavy desktop users."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 3, rows)
    return pd.DataFrame(
        {
            "visitor_id": [f"V{i:04d}" for i in range(rows)],
            "sessions": rng.poisson(np.array([2, 15, 60])[group]).astype(float),
            "pages_per_session": (np.array([1.5, 6.0, 3.0])[group] + rng.normal(0, 0.3, rows)).clip(0.1).round(2),
            "device": np.array(["mobile", "tablet", "desktop"])[group],
        }
    )


async def test_a_fourth_kind_works_through_every_door(web_kind, client, analyst_headers, user_headers):
    bad = await client.post(
        "/segmentations", json={"name": "site", "kind": "web", "features": WEB_FEATURES}, headers=analyst_headers
    )
    assert bad.status_code == 422 and "kind web has its own columns" in bad.json()["detail"]

    created = await client.post("/segmentations", json={"name": "site", "kind": "web"}, headers=analyst_headers)
    assert created.status_code == 201, created.text
    assert created.json()["kind"] == "web"
    schema = created.json()["customer_schema"]
    assert set(schema["required"]) == {"sessions", "pages_per_session", "device"}

    no_file = await client.post("/segmentations/site/train", headers=analyst_headers)
    assert no_file.status_code == 422 and "a CSV of visitors" in no_file.json()["detail"]

    table = visitors()
    upload = {"file": ("visitors.csv", table.to_csv(index=False).encode(), "text/csv")}
    trained = await client.post(
        "/segmentations/site/train", params={"n_clusters": 3, "random_state": 0}, files=upload, headers=analyst_headers
    )
    assert trained.status_code == 200, trained.text
    assert trained.json()["segmentation"] == "site" and trained.json()["n_samples"] == len(table)
    first_version = trained.json()["model_version"]

    heavy = {"sessions": 58, "pages_per_session": 3.1, "device": "desktop"}
    light = {"sessions": 1, "pages_per_session": 1.4, "device": "mobile"}
    answers = []
    for visitor in (heavy, light):
        answer = await client.post("/segmentations/site/predict", json={"customer": visitor}, headers=user_headers)
        assert answer.status_code == 200, answer.text
        answers.append(answer.json())
    assert answers[0]["cluster"] != answers[1]["cluster"]
    assert answers[0]["customer_data"] == heavy and answers[0]["model_version"] == first_version

    wrong = await client.post(
        "/segmentations/site/predict", json={"customer": {**heavy, "sessions": "many"}}, headers=user_headers
    )
    assert wrong.status_code == 422 and wrong.json()["errors"][0]["loc"][-1] == "sessions"

    batch = await client.post(
        "/segmentations/site/predict/batch",
        files={"file": ("batch.csv", table.head(30).to_csv(index=False).encode(), "text/csv")},
        headers=user_headers,
    )
    assert batch.status_code == 200, batch.text
    clusters = [row["cluster"] for row in batch.json()["predictions"]]
    assert len(clusters) == 30

    history = await client.get("/history", params={"segmentation": "site"}, headers=user_headers)
    assert [item["customer_data"] for item in history.json()["history"]] == [light, heavy]

    summary = await client.get("/segmentations/site/clusters", headers=user_headers)
    assert summary.status_code == 200 and summary.json()["total_customers"] == len(table)

    again = await client.post(
        "/segmentations/site/train", params={"n_clusters": 3, "random_state": 1}, files=upload, headers=analyst_headers
    )
    assert again.status_code == 200, again.text
    compared = await client.post(
        "/segmentations/site/compare",
        params={"from_version": first_version, "to_version": again.json()["model_version"]},
        files=upload,
        headers=analyst_headers,
    )
    assert compared.status_code == 200, compared.text
    assert compared.json()["n_customers"] == len(table) and compared.json()["unchanged_segments"] > 0.9


async def test_the_kind_is_offered_only_while_registered(client, analyst_headers):
    refused = await client.post("/segmentations", json={"name": "site", "kind": "web"}, headers=analyst_headers)
    assert refused.status_code == 422
    assert "'customer', 'custom', 'rfm'" in refused.json()["detail"]
