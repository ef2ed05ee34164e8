"""drift.changed through HTTP: one check per DRIFT_CHECK_MINUTES across workers, sent when a status moves.

Two app instances share the database, as two workers do; both run the drift watch, and the receiver
gets the move once. Waits poll until a generous deadline.
"""

from __future__ import annotations

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import select

from app.core.tables import ServiceState
from app.main import create_app
from tests.test_drift import resample, score_csv, training_frame
from tests.test_webhooks import eventually, settled, subscribe, verified
from tests.webhook_receiver import Receiver


@pytest.fixture
def settings_overrides() -> dict:
    return {
        "webhook_allow_private": True,
        "webhook_poll_seconds": 0.1,
        "drift_flush_seconds": 0.2,
        "drift_bucket_seconds": 1,
        "drift_check_minutes": 0.005,  # 0.3 s
    }


async def _seen(app) -> str | None:
    async with app.state.database.sessionmaker() as session:
        return (
            await session.execute(select(ServiceState.value).where(ServiceState.key == "drift_status:1"))
        ).scalar_one_or_none()


async def test_a_drift_status_move_is_sent_once_across_workers(
    app, client, settings, trained_model, dataset, admin_headers, user_headers
):
    version = trained_model["model_version"]
    with Receiver() as receiver:
        hook = await subscribe(client, admin_headers, receiver.url(), events=["drift.changed"])
        other = create_app(settings)
        async with LifespanManager(other, startup_timeout=60, shutdown_timeout=30):
            transport = httpx.ASGITransport(app=other, client=("127.0.0.1", 50001))
            async with httpx.AsyncClient(transport=transport, base_url="http://other") as second:
                await score_csv(second, user_headers, resample(dataset, 2000, seed=1))

                async def stable_seen():
                    return await _seen(app) == f"{version} stable"

                await eventually(stable_seen, "the stable status seen by a drift check")
                shifted = resample(dataset, 10_000, seed=2)
                income = training_frame(dataset)["annual_income"]
                shifted["annual_income"] = (shifted["annual_income"] + income.std()).round(2)
                await score_csv(client, user_headers, shifted)
                await score_csv(second, user_headers, shifted)

                async def significant_seen():
                    return await _seen(app) == f"{version} significant"

                await eventually(significant_seen, "the significant status seen by a drift check")
                [sent] = await settled(client, admin_headers, hook["id"], 1)
                # Further checks, by either worker, find nothing new to send.
                await eventually(lambda: _checked_again(app), "another drift check")
        assert sent["status"] == "delivered" and sent["event"] == "drift.changed"
        assert len(receiver.received()) == 1
        body = verified(hook["secret"], receiver.received()[0])
        assert body["type"] == "drift.changed"
        data = body["data"]
        assert data["segmentation"] == "default" and data["model_version"] == version
        assert (data["from"], data["to"]) == ("stable", "significant")
        features = {f["feature"]: f for f in data["features"]}
        assert features["annual_income"]["status"] == "significant"
        assert (await settled(client, admin_headers, hook["id"], 1))[0]["message_id"] == sent["message_id"]


async def _checked_again(app) -> bool:
    async with app.state.database.sessionmaker() as session:
        first = (
            await session.execute(select(ServiceState.updated_at).where(ServiceState.key == "drift_check"))
        ).scalar_one()
    async with app.state.database.sessionmaker() as session:
        seen = (
            await session.execute(select(ServiceState.updated_at).where(ServiceState.key == "drift_status:1"))
        ).scalar_one()
    return first > seen
