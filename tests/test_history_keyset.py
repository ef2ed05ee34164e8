"""GET /history?before_id=N: keyset pages, walked by next_before_id."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

import pytest

from app.core.tables import PREDICTION_HISTORY, Role
from app.history.predictions import history_row
from tests.conftest import CUSTOMER

pytestmark = pytest.mark.postgres


async def _predict(client, headers, count: int, first_age: int = 20) -> None:
    for age in range(first_age, first_age + count):
        response = await client.post("/predict", json={**CUSTOMER, "age": age}, headers=headers)
        assert response.status_code == 200, response.text


async def _walk(client, headers, limit: int, **params) -> tuple[list[dict], list[dict]]:
    """Every page from the first by next_before_id, `params` on each: (the items, the pages)."""
    items: list[dict] = []
    pages: list[dict] = []
    query: dict = {"limit": limit, **params}
    while True:
        response = await client.get("/history", params=query, headers=headers)
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append(page)
        items += page["history"]
        if page["next_before_id"] is None:
            return items, pages
        assert page["next_before_id"] == page["history"][-1]["id"]
        query = {"limit": limit, **params, "before_id": page["next_before_id"]}
        assert len(pages) < 100, "the walk does not end"


async def _all(client, headers) -> list[dict]:
    response = await client.get("/history", params={"limit": 200}, headers=headers)
    assert response.status_code == 200
    assert response.json()["next_before_id"] is None
    return response.json()["history"]


async def test_a_walk_by_next_before_id_gets_every_row_once_newest_first(client, make_user, trained_model):
    _, headers = await make_user(Role.user)
    await _predict(client, headers, 23)
    items, pages = await _walk(client, headers, limit=5)
    assert [item["id"] for item in items] == [item["id"] for item in await _all(client, headers)]
    assert [item["customer_data"]["age"] for item in items] == list(range(42, 19, -1))
    assert [len(page["history"]) for page in pages] == [5, 5, 5, 5, 3]
    assert {page["total"] for page in pages} == {23}
    assert pages[-1]["next_before_id"] is None

    # A history that fills its last page exactly ends there too, not on an empty page.
    _, exact = await make_user(Role.user)
    await _predict(client, exact, 4)
    _, exact_pages = await _walk(client, exact, limit=2)
    assert [len(page["history"]) for page in exact_pages] == [2, 2]
    # And an empty history is one empty page.
    _, empty = await make_user(Role.user)
    page = (await client.get("/history", headers=empty)).json()
    assert page == {"history": [], "total": 0, "skip": 0, "limit": 50, "next_before_id": None}


async def test_new_predictions_between_pages_do_not_shift_a_keyset_walk(client, make_user, trained_model):
    _, headers = await make_user(Role.user)
    await _predict(client, headers, 12)
    before = [item["id"] for item in await _all(client, headers)]
    first = (await client.get("/history", params={"limit": 4}, headers=headers)).json()
    await _predict(client, headers, 3, first_age=60)  # newer rows arrive meanwhile
    items = list(first["history"])
    cursor = first["next_before_id"]
    while cursor is not None:
        page = (await client.get("/history", params={"limit": 4, "before_id": cursor}, headers=headers)).json()
        assert page["total"] == 15
        items += page["history"]
        cursor = page["next_before_id"]
    assert [item["id"] for item in items] == before
    # The same walk by skip would have sent rows of the first page again.
    by_skip = (await client.get("/history", params={"limit": 4, "skip": 4}, headers=headers)).json()
    assert by_skip["history"][0]["id"] == first["history"][1]["id"]


async def test_skip_with_before_id_counts_from_that_row(client, make_user, trained_model):
    _, headers = await make_user(Role.user)
    await _predict(client, headers, 10)
    ids = [item["id"] for item in await _all(client, headers)]
    page = (await client.get("/history", params={"before_id": ids[2], "skip": 2, "limit": 3}, headers=headers)).json()
    assert [item["id"] for item in page["history"]] == ids[5:8]
    assert page["skip"] == 2 and page["limit"] == 3 and page["total"] == 10
    assert page["next_before_id"] == ids[7]
    tail = (await client.get("/history", params={"before_id": ids[7], "limit": 3}, headers=headers)).json()
    assert [item["id"] for item in tail["history"]] == ids[8:] and tail["next_before_id"] is None
    # The oldest row has nothing before it; skipping past the end is an empty last page.
    oldest = (await client.get("/history", params={"before_id": ids[-1]}, headers=headers)).json()
    assert oldest["history"] == [] and oldest["next_before_id"] is None and oldest["total"] == 10
    past = (await client.get("/history", params={"before_id": ids[0], "skip": 50}, headers=headers)).json()
    assert past["history"] == [] and past["next_before_id"] is None


async def test_another_users_rows_never_appear_and_their_ids_are_not_cursors(client, make_user, trained_model):
    alice, alice_headers = await make_user(Role.user)
    _, bob_headers = await make_user(Role.user)
    _, analyst_headers = await make_user(Role.analyst)
    for age in range(20, 30):  # interleaved: the two histories' ids alternate
        for headers in (alice_headers, bob_headers):
            response = await client.post("/predict", json={**CUSTOMER, "age": age}, headers=headers)
            assert response.status_code == 200
    alice_ids = [item["id"] for item in await _all(client, alice_headers)]
    bob_ids = [item["id"] for item in await _all(client, bob_headers)]
    items, _ = await _walk(client, alice_headers, limit=3)
    assert [item["id"] for item in items] == alice_ids
    assert not set(alice_ids) & set(bob_ids)

    # Bob's row is not a place in Alice's history: the same answer as an id nobody has.
    for before_id in (bob_ids[3], 2**31 - 1):
        response = await client.get("/history", params={"before_id": before_id}, headers=alice_headers)
        assert response.status_code == 404, response.text
        assert isinstance(response.json()["detail"], str)
        assert str(before_id) in response.json()["detail"]
    # An analyst walks Alice's history by her row ids, and Alice's ids are no cursor in Bob's.
    items, _ = await _walk(client, analyst_headers, limit=4, user_id=alice["id"])
    assert [item["id"] for item in items] == alice_ids
    response = await client.get("/history", params={"before_id": alice_ids[0]}, headers=bob_headers)
    assert response.status_code == 404


@pytest.mark.parametrize("before_id", ["0", "-3", "abc", "1.5", str(2**31), ""])
async def test_a_malformed_before_id_is_a_422_naming_it(client, user_headers, before_id):
    response = await client.get(f"/history?before_id={before_id}", headers=user_headers)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"] == ["query", "before_id"]
    assert response.json()["detail"].startswith("before_id: ")


async def test_rows_with_the_same_timestamp_are_each_walked_once(app, client, make_user):
    """Several workers can stamp rows in the same microsecond: the cursor is (created_at, id), not the time alone."""
    user, headers = await make_user(Role.user)
    stamps = [datetime(2026, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)] * 7 + [datetime(2026, 3, 1, 11, 0, tzinfo=UTC)] * 3
    rows = []
    for number, stamp in enumerate(stamps):
        row = history_row(
            user_id=user["id"],
            customer={**CUSTOMER, "age": 20 + number},
            cluster=number % 3,
            cluster_name="Segment",
            confidence=0.5,
            model_version="v1",
        )
        rows.append({**row, "created_at": stamp})
    async with app.state.database.engine.begin() as conn:
        await conn.execute(PREDICTION_HISTORY.insert(), rows)
    expected = [item["id"] for item in await _all(client, headers)]
    assert len(expected) == 10
    for limit in (1, 2, 3, 6):
        items, _ = await _walk(client, headers, limit=limit)
        assert [item["id"] for item in items] == expected


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_slow_history_read_does_not_hold_up_other_requests(app, client, user_headers):
    """SQLite history reads run on the repository's reader thread: a stuck read leaves the event loop free."""
    history = app.state.services.history
    release = threading.Event()
    started = threading.Event()
    read_page = history._page

    def stuck_page(*args):
        started.set()
        release.wait(60)
        return read_page(*args)

    history._page = stuck_page
    try:
        reading = asyncio.create_task(client.get("/history", headers=user_headers))
        assert await asyncio.to_thread(started.wait, 60)
        # With the read stuck, the service still answers; were the read on the loop, this would hang.
        health = await client.get("/")
        assert health.status_code == 200
        assert not reading.done()
    finally:
        release.set()
    response = await reading
    assert response.status_code == 200 and response.json()["total"] == 0


@pytest.mark.postgres
async def test_pages_asked_at_once_each_get_their_own_answer_and_one_bad_cursor_fails_alone(
    client, make_user, trained_model
):
    users = [await make_user(Role.user) for _ in range(3)]
    for n, (_, headers) in enumerate(users):
        for age in range(20, 23 + n):
            response = await client.post("/predict", json={**CUSTOMER, "age": age}, headers=headers)
            assert response.status_code == 200
    expected = [await _all(client, headers) for _, headers in users]
    requests = [(i, {"limit": 2}) for i in range(3)] * 5 + [(0, {"before_id": 2**31 - 1})]
    responses = await asyncio.gather(
        *(client.get("/history", params=params, headers=users[i][1]) for i, params in requests)
    )
    for (i, params), response in zip(requests, responses, strict=True):
        if "before_id" in params:
            assert response.status_code == 404, response.text
            continue
        assert response.status_code == 200, response.text
        page = response.json()
        assert page["total"] == len(expected[i])
        assert page["history"] == expected[i][:2]
        assert page["next_before_id"] == expected[i][1]["id"]


async def test_a_page_cancelled_while_its_batch_runs_leaves_the_others_answered():
    from app.history.storage.sqlite_history import BatchedThread

    thread = BatchedThread("test-reader")
    started, release = threading.Event(), threading.Event()

    def held(value: int) -> int:
        started.set()
        assert release.wait(60)
        return value

    try:
        first = asyncio.ensure_future(thread.call(held, 0))
        assert await asyncio.to_thread(started.wait, 60)  # on the thread; the next calls queue behind it
        queued = [asyncio.ensure_future(thread.call(held, n)) for n in range(1, 4)]
        await asyncio.sleep(0)
        first.cancel()  # its client went away while its call ran
        release.set()
        assert await asyncio.gather(*queued) == [1, 2, 3]
        queued_cancelled = asyncio.ensure_future(thread.call(held, 9))
        await asyncio.sleep(0)
        queued_cancelled.cancel()
        assert await thread.call(held, 5) == 5
    finally:
        release.set()
        thread.shutdown()
