"""Swagger UI in a real browser against a real server: offline assets, Authorize, Try it out, errors.

Runs Debian's Chromium (`apt-get install chromium`, done by `make install-dev` when root)
through Playwright. Skipped only when no Chromium executable is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import CUSTOMER

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def chromium_executable() -> str | None:
    for candidate in (os.environ.get("CHROMIUM_PATH"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = chromium_executable()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium executable: run `make install-dev` as root, or "
        "`apt-get install chromium` (or set CHROMIUM_PATH)",
    ),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(env: dict[str, str], cwd: Path, *args: str) -> None:
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """A uvicorn process on a free port with its own database, model folder, dataset, admin and model."""
    home = tmp_path_factory.mktemp("server")
    csv = home / "customers.csv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "MODEL_", "DATA_", "APP_ENV"))}
    env.update(
        PYTHONPATH=str(ROOT),
        DATABASE_URL=f"sqlite+aiosqlite:///{home / 'browser.db'}",
        MODEL_DIR=str(home / "models"),
        DATA_PATH=str(csv),
        SECRET_KEY="browser-test-secret-key-long-enough-0123456789",
        BCRYPT_ROUNDS="4",
    )
    _run(env, home, str(ROOT / "generate_dataset.py"), "--rows", "800", "--out", str(csv))
    _run(env, home, str(ROOT / "create_admin.py"))
    _run(env, home, "-m", "app", "train", "--csv", str(csv), "--k", "5")

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(home / "server.log", "w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
        ],
        cwd=home,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited:\n{(home / 'server.log').read_text()}")
            try:
                if httpx.get(f"{base}/", timeout=2, trust_env=False).json().get("model_loaded"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not come up:\n{(home / 'server.log').read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


async def test_swagger_ui_authorize_and_try_predict(server, tmp_path):
    async_api = pytest.importorskip("playwright.async_api")

    requested: list[str] = []
    console_errors: list[str] = []
    async with async_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1600})
            page.on("request", lambda request: requested.append(request.url))
            page.on("console", lambda message: message.type == "error" and console_errors.append(message.text))
            await page.goto(f"{server}/docs", wait_until="networkidle")
            await page.wait_for_selector(".swagger-ui .info .title", timeout=60_000)
            assert "Customer Segmentation API" in await page.inner_text(".swagger-ui .info .title")

            # Authorize with the OAuth2 password form, as a person would.
            await page.click(".scheme-container button.authorize")
            await page.fill("#oauth_username", "admin")
            await page.fill("#oauth_password", "admin123")
            await page.click(".auth-btn-wrapper button.authorize")
            await page.wait_for_selector(".auth-container button.btn-done", timeout=60_000)
            await page.wait_for_selector(".auth-container :text('Logout')", timeout=60_000)
            await page.click(".auth-container button.btn-done")

            # POST /predict: open it, Try it out with the example body, Execute.
            operation = page.locator("#operations-segmentation-predict_predict_post")
            await operation.locator(".opblock-summary").first.click()
            await operation.locator("button.try-out__btn").click()
            body = await operation.locator("textarea.body-param__text").input_value()
            assert '"annual_income"' in body
            await operation.locator("button.execute").click()
            live = operation.locator(".live-responses-table .response")
            await live.first.wait_for(timeout=60_000)
            status = (await live.locator(".response-col_status").first.inner_text()).strip()
            answer = await operation.locator(".live-responses-table .response-col_description pre").first.inner_text()
            await page.screenshot(path=str(tmp_path / "swagger-predict.png"), full_page=True)
        finally:
            await browser.close()

    assert status == "200", answer
    assert '"cluster_name"' in answer and '"model_version"' in answer
    assert (tmp_path / "swagger-predict.png").stat().st_size > 10_000

    assert requested, "the browser made no requests"
    elsewhere = [
        url
        for url in requested
        if urlsplit(url).scheme in ("http", "https", "ws", "wss") and urlsplit(url).hostname not in LOCAL_HOSTS
    ]
    assert not elsewhere, f"requests left the machine: {elsewhere}"
    assert not [e for e in console_errors if "Content Security Policy" in e], console_errors
    assert any(urlsplit(url).path == "/auth/login" for url in requested)
    assert any(urlsplit(url).path == "/predict" for url in requested)


async def _authorize(page, server: str) -> None:
    """Open Swagger UI and Authorize as the admin with the OAuth2 password form, as a person would."""
    await page.goto(f"{server}/docs", wait_until="networkidle")
    await page.wait_for_selector(".swagger-ui .info .title", timeout=60_000)
    await page.click(".scheme-container button.authorize")
    await page.fill("#oauth_username", "admin")
    await page.fill("#oauth_password", "admin123")
    await page.click(".auth-btn-wrapper button.authorize")
    await page.wait_for_selector(".auth-container :text('Logout')", timeout=60_000)
    await page.click(".auth-container button.btn-done")


async def _try_out(page, operation_id: str, body: dict) -> tuple[str, str]:
    """Try it out with `body` in place of the example, Execute: the status and response body shown."""
    operation = page.locator(f"#{operation_id}")
    await operation.locator(".opblock-summary").first.click()
    await operation.locator("button.try-out__btn").click()
    await operation.locator("textarea.body-param__text").fill(json.dumps(body))
    await operation.locator("button.execute").click()
    live = operation.locator(".live-responses-table .response")
    await live.first.wait_for(timeout=60_000)
    status = (await live.locator(".response-col_status").first.inner_text()).strip()
    shown = await operation.locator(".live-responses-table .response-col_description pre").first.inner_text()
    return status, shown


async def test_swagger_ui_shows_a_broken_field_rule_as_one_sentence(server, tmp_path):
    """A short password on the profile, an income over 10000 and a bad registration: the 422 shown
    names each field in `detail` as text, and the rejected password is not sent back."""
    async_api = pytest.importorskip("playwright.async_api")
    password = "Qz7#kW"  # six characters, under the eight a password needs
    probes = [
        ("operations-users-update_me_users_me_put", {"password": password, "current_password": "admin123"}),
        ("operations-segmentation-predict_predict_post", {**CUSTOMER, "annual_income": 20000}),
        (
            "operations-auth-register_auth_register_post",
            {"email": "new@example.com", "username": "no spaces!", "password": password},
        ),
    ]
    shown: list[tuple[str, dict]] = []
    async with async_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1600})
            await _authorize(page, server)
            for operation_id, body in probes:
                status, text = await _try_out(page, operation_id, body)
                assert "[object Object]" not in text and password not in text, text
                shown.append((status, json.loads(text)))
            await page.screenshot(path=str(tmp_path / "swagger-422.png"), full_page=True)
        finally:
            await browser.close()

    assert [status for status, _ in shown] == ["422"] * 3, shown
    assert shown[0][1]["detail"] == "password: String should have at least 8 characters"
    assert shown[1][1]["detail"] == "annual_income: Input should be less than or equal to 10000"
    registration = shown[2][1]["detail"].split("; ")
    assert [part.split(":")[0] for part in registration] == ["username", "password"], registration
    for _, answer in shown:
        assert isinstance(answer["detail"], str)
        assert all(set(error) == {"type", "loc", "msg"} for error in answer["errors"]), answer


def test_redoc_renders_offline(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")

    requested: list[str] = []
    blocked: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            # The page's Content-Security-Policy stops the bundle's CDN logo inside the browser.
            page.on(
                "requestfailed",
                lambda request: "csp" in (request.failure or "").lower() and blocked.append(request.url),
            )
            page.goto(f"{server}/redoc", wait_until="networkidle")
            page.wait_for_selector("text=Customer Segmentation API", timeout=60_000)
            page.screenshot(path=str(tmp_path / "redoc.png"))
        finally:
            browser.close()
    elsewhere = [
        url
        for url in requested
        if url not in blocked
        and urlsplit(url).scheme in ("http", "https")
        and urlsplit(url).hostname not in LOCAL_HOSTS
    ]
    assert not elsewhere, f"requests left the machine: {elsewhere}"
    assert any(urlsplit(url).path == "/openapi.json" for url in requested)
