"""Request logs, request ids and Prometheus metrics, as an operator sees them."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from datetime import datetime

import httpx
import pytest
from fastapi import Request
from prometheus_client.parser import text_string_to_metric_families

from app.core.config import Settings
from app.core.observability import JsonFormatter, access_log, configure_logging, redact, sane_request_id
from tests.conftest import CUSTOMER

NEW_PASSWORD = "another-horse-77"
# Request lines are written every LOG_FLUSH_SECONDS; a busy machine may take far longer.
LOG_DEADLINE_SECONDS = 30
A_JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig_nat-ure"


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus exposition."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _json_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


async def _stderr_until(capsys, done: Callable[[str], bool], deadline: float = LOG_DEADLINE_SECONDS) -> str:
    """What the app wrote to stderr, read until `done(text)`: the request lines come in batches."""
    text = ""
    give_up = time.monotonic() + deadline
    while True:
        text += capsys.readouterr().err
        if done(text):
            return text
        assert time.monotonic() < give_up, f"not in the log after {deadline} s:\n{text}"
        await asyncio.sleep(0.05)


def _request_lines(text: str, request_id: str) -> list[dict]:
    return [
        line
        for line in _json_lines(text)
        if line.get("logger") == "app.requests" and line.get("request_id") == request_id
    ]


@pytest.fixture
def settings_overrides() -> dict:
    return {"log_format": "json", "log_level": "DEBUG"}


async def test_logs_never_carry_passwords_tokens_or_hashes(client, trained_model, capsys, caplog):
    caplog.set_level(logging.DEBUG, logger="app")
    password = "first-secret-pass-1"
    registered = await client.post(
        "/auth/register", json={"email": "logcheck@example.com", "username": "logcheck", "password": password}
    )
    assert registered.status_code == 201
    login = await client.post("/auth/login", data={"username": "logcheck", "password": password})
    token = login.json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    assert (await client.post("/predict", json=CUSTOMER, headers=headers)).status_code == 200
    changed = await client.put(
        "/users/me", json={"password": NEW_PASSWORD, "current_password": password}, headers=headers
    )
    assert changed.status_code == 200
    assert (await client.get("/auth/me", headers=headers)).status_code == 401  # the old token is over
    wrong = await client.post("/auth/login", json={"username": "logcheck", "password": password})
    assert wrong.status_code == 401
    relogin = await client.post("/auth/login", json={"username": "logcheck", "password": NEW_PASSWORD})
    new_token = relogin.json()["access_token"]
    assert (await client.post("/auth/logout", headers={"Authorization": f"Bearer {new_token}"})).status_code == 200
    # A client may put a token where a request id or a path goes: the line still does not show it.
    await client.get(f"/profiles/{A_JWT}", headers={"X-Request-ID": A_JWT})

    expected = {"/auth/login", "/predict", "/users/me", "/auth/logout", "/profiles/{profile_id}"}
    output = await _stderr_until(capsys, lambda text: expected <= {line.get("route") for line in _json_lines(text)})
    records = "\n".join(
        f"{r.getMessage()} {r.args!r} {getattr(r, 'fields', '')} {r.exc_text or ''}" for r in caplog.records
    )
    redacted = [line for line in _json_lines(output) if line.get("route") == "/profiles/{profile_id}"]
    assert redacted[0]["request_id"] == "[redacted-token]" and redacted[0]["path"] == "/profiles/[redacted-token]"
    for text in (output, caplog.text, records):
        for secret in (password, NEW_PASSWORD, token, new_token, A_JWT, "$2b$"):
            assert secret not in text


async def test_one_json_line_per_request_with_id_user_route_status_latency(client, make_user, capsys):
    user, headers = await make_user()
    response = await client.get("/profiles/424242", headers={**headers, "X-Request-ID": "trace-me.42"})
    assert response.status_code == 404
    output = await _stderr_until(capsys, lambda text: bool(_request_lines(text, "trace-me.42")))
    # Whatever else comes in later batches, this request has exactly one line.
    access_log.flush()
    lines = _request_lines(output + capsys.readouterr().err, "trace-me.42")
    assert len(lines) == 1
    line = lines[0]
    assert line["user_id"] == user["id"]
    assert line["method"] == "GET" and line["route"] == "/profiles/{profile_id}" and line["status"] == 404
    assert (
        line["path"] == "/profiles/424242"
        and line["message"] == f"GET /profiles/{{profile_id}} 404 {line['duration_ms']:.1f}ms"
    )
    assert isinstance(line["duration_ms"], (int, float)) and line["duration_ms"] >= 0
    assert line["level"] == "INFO" and datetime.fromisoformat(line["time"]).tzinfo is not None


async def test_training_log_goes_through_the_same_formatter_with_the_request_id(
    client, dataset, analyst_headers, capsys
):
    capsys.readouterr()
    response = await client.post(
        "/train", params={"n_clusters": 3}, headers={**analyst_headers, "X-Request-ID": "train-1"}
    )
    assert response.status_code == 200
    lines = _json_lines(capsys.readouterr().err)
    trained = [line for line in lines if line["logger"] == "app.models" and "trained model" in line["message"]]
    assert trained and trained[0]["request_id"] == "train-1"


@pytest.mark.parametrize("settings_overrides", [{"log_format": "text"}])
async def test_text_log_line_is_readable(client, make_user, capsys):
    user, headers = await make_user()
    await client.get("/auth/me", headers={**headers, "X-Request-ID": "abc-1"})
    output = await _stderr_until(capsys, lambda text: "request_id=abc-1" in text)
    line = next(line for line in output.splitlines() if "request_id=abc-1" in line)
    pattern = rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} INFO app\.requests GET /auth/me 200 \d+\.\dms request_id=abc-1 user_id={user['id']}"
    assert re.fullmatch(pattern, line), line


@pytest.mark.parametrize("settings_overrides", [{"log_level": "WARNING"}])
async def test_log_level_warning_turns_the_request_line_off(client, capsys):
    assert (await client.get("/", headers={"X-Request-ID": "quiet-1"})).status_code == 200
    assert (await client.get("/no/such/page", headers={"X-Request-ID": "quiet-2"})).status_code == 404
    access_log.flush()  # whatever was queued is written now
    assert "quiet-" not in capsys.readouterr().err


@pytest.mark.parametrize("settings_overrides", [{"log_level": "INFO"}])
async def test_metrics_scrapes_stay_out_of_the_info_log(client, capsys):
    assert (await client.get("/metrics", headers={"X-Request-ID": "scrape-1"})).status_code == 200
    assert (await client.get("/", headers={"X-Request-ID": "after-scrape"})).status_code == 200
    output = await _stderr_until(capsys, lambda text: "after-scrape" in text)
    access_log.flush()
    assert "scrape-1" not in output + capsys.readouterr().err


async def test_request_id_is_echoed_when_sane_and_generated_otherwise(client):
    echoed = await client.get("/", headers={"X-Request-ID": "Abc.def_1-2"})
    assert echoed.headers["x-request-id"] == "Abc.def_1-2"
    for bad in ("has space", "x" * 129, "semi;colon", "ü-nicode", ""):
        response = await client.get("/", headers={"X-Request-ID": bad.encode("utf-8")})
        generated = response.headers["x-request-id"]
        assert generated != bad and sane_request_id(generated) == generated
    first, second = (await client.get("/")).headers["x-request-id"], (await client.get("/")).headers["x-request-id"]
    assert first != second
    # Errors carry it too, and browsers may read it.
    response = await client.get("/auth/me", headers={"X-Request-ID": "on-401", "Origin": "http://localhost:5173"})
    assert response.status_code == 401 and response.headers["x-request-id"] == "on-401"
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()
    assert (await client.get("/no/such/page", headers={"X-Request-ID": "on-404"})).headers["x-request-id"] == "on-404"


async def test_metrics_after_predictions_training_and_a_login_failure(client, trained_model, make_user):
    _, headers = await make_user()
    predicted = (await client.post("/predict", json=CUSTOMER, headers=headers)).json()
    batch = await client.post("/predict/batch", json={"customers": [CUSTOMER, CUSTOMER]}, headers=headers)
    assert batch.status_code == 200
    assert (await client.post("/auth/login", data={"username": "nobody", "password": "wrong-pass"})).status_code == 401
    await client.get(f"/profiles/{987654}", headers=headers)

    response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    segment = (("cluster", str(predicted["cluster"])), ("cluster_name", predicted["cluster_name"]))
    default = ("segmentation", "default")
    assert samples[("segmentation_predictions_total", (*segment, ("kind", "single"), default))] == 1
    assert samples[("segmentation_predictions_total", (*segment, ("kind", "batch"), default))] == 2
    assert samples[("auth_login_failures_total", (("reason", "invalid_credentials"),))] == 1
    assert samples[("segmentation_training_runs_total", (("outcome", "success"), default))] == 1
    assert samples[("segmentation_training_duration_seconds_count", (default,))] == 1
    assert samples[("segmentation_model_loaded", ())] == 1
    info = [labels for (name, labels) in samples if name == "segmentation_model_info"]
    assert info and dict(info[0])["version"] == trained_model["model_version"]
    assert samples[("http_requests_total", (("method", "POST"), ("route", "/predict"), ("status", "200")))] == 1
    # Route templates, never raw paths: ids do not become label values.
    assert (
        "http_requests_total",
        (("method", "GET"), ("route", "/profiles/{profile_id}"), ("status", "404")),
    ) in samples
    assert "987654" not in response.text
    assert (
        samples[("http_request_duration_seconds_count", (("method", "POST"), ("route", "/predict"), ("status", "200")))]
        == 1
    )


async def test_each_app_has_its_own_registry(client, app):
    from app.main import create_app

    other = create_app(app.state.settings)
    assert other.state.metrics.registry is not app.state.metrics.registry


@pytest.mark.parametrize("settings_overrides", [{"metrics_token": "scrape-token-1234"}])
async def test_metrics_token_lets_only_the_scraper_read_the_metrics(client, user_headers):
    """With METRICS_TOKEN set, /metrics answers only that bearer token; a user's token is not it."""
    for headers in (
        {},
        user_headers,
        {"Authorization": "Bearer scrape-token-123"},
        {"Authorization": "Basic scrape-token-1234"},
    ):
        refused = await client.get("/metrics", headers=headers)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert "METRICS_TOKEN" in refused.json()["detail"] and "http_requests_total" not in refused.text
    scraped = await client.get("/metrics", headers={"Authorization": "Bearer scrape-token-1234"})
    assert scraped.status_code == 200 and "http_requests_total" in scraped.text


@pytest.mark.parametrize("settings_overrides", [{"metrics_enabled": False}])
async def test_metrics_can_be_turned_off(client):
    assert (await client.get("/metrics")).status_code == 404
    assert (await client.get("/", headers={"X-Request-ID": "still-here"})).headers["x-request-id"] == "still-here"


def test_configure_logging_installs_one_handler(tmp_path):
    settings = Settings(_env_file=None, secret_key="x" * 40, log_format="json", log_level="warning")
    configure_logging(settings)
    configure_logging(settings)
    root = logging.getLogger()
    ours = [h for h in root.handlers if h.get_name() == "app.core.observability"]
    assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter)
    assert logging.getLogger("app").level == logging.WARNING
    with pytest.raises(ValueError):
        configure_logging(Settings(_env_file=None, secret_key="x" * 40, log_level="chatty"))
    configure_logging(Settings(_env_file=None, secret_key="x" * 40))


def test_redaction_is_a_safety_net_for_tokens_and_hashes():
    text = (
        "Authorization: Bearer abc.def.ghi-jkl token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig_nat-ure "
        "hash $2b$12$abcdefghijklmnopqrstuuVWXyz0123456789ABCDEFGHIJKLMNOPQ"
    )
    clean = redact(text)
    assert "eyJ" not in clean and "$2b$" not in clean and "abc.def.ghi-jkl" not in clean


async def test_unhandled_errors_are_logged_with_their_request_id(app, capsys):
    @app.get("/test-only/request-id")
    async def request_id(request: Request) -> dict:
        return {"request_id": request.state.request_id}

    @app.get("/test-only/boom")
    async def boom() -> dict:
        raise RuntimeError("boom")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        seen = await http.get("/test-only/request-id", headers={"X-Request-ID": "handler-sees-it"})
        assert seen.json() == {"request_id": "handler-sees-it"}
        failed = await http.get("/test-only/boom", headers={"X-Request-ID": "boom-1"})
    assert failed.status_code == 500 and "boom" not in failed.text
    output = await _stderr_until(capsys, lambda text: "Traceback" in text and bool(_request_lines(text, "boom-1")))
    lines = [line for line in _json_lines(output) if line.get("request_id") == "boom-1"]
    assert [line["status"] for line in lines if line["logger"] == "app.requests"] == [500]
    assert any("Traceback" in line.get("exception", "") for line in lines), "the traceback lost its request id"
    # The request's line is written before the traceback that follows it, not in a later batch.
    assert lines[0]["logger"] == "app.requests"
