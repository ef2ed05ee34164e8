"""Schemathesis against the in-process app: every documented operation, as a user and as an admin.

Generated requests (valid and invalid) go through the ASGI app with a trained model in place.
Every response must be no server error, carry a documented status code and content type, and
match its documented schema. The run is reproducible (fixed seed) and bounded (few examples per
operation) so it stays within a couple of minutes on a small machine.

Self-destructive calls get a disposable identity instead of the run's own: logout revokes a
freshly minted token of the same account, DELETE /users/me deletes a throwaway account.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck
from schemathesis.checks import positive_data_acceptance

from app.core import security as auth
from app.core.config import Settings
from app.core.database import Database
from app.core.migrations import upgrade_database
from app.core.tables import Base, Role, User
from app.main import create_app
from tests.conftest import make_settings, postgres_url

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 20
SEED = 20240601
# The accounts the run acts as have ids no generated path parameter is likely to name.
ACTING = {Role.admin: 1_000_001, Role.user: 1_000_002}
# Low ids exist and are fair game for the admin's user management: deleting, demoting, deactivating.
VICTIMS = range(1, 13)
DISPOSABLE = range(2_000_000, 2_000_400)
PASSWORD_HASH = auth.hash_password("fuzz-password-1", 4)

EXAMPLES: Counter[tuple[str, str]] = Counter()
STATUSES: Counter[tuple[str, int]] = Counter()
SUCCESSES: set[tuple[str, str, str]] = set()  # (backend, role, operation) that answered 2xx


async def _seed(settings: Settings) -> None:
    database = Database(settings.database_url)
    try:
        if not database.is_sqlite:  # the PostgreSQL test database is shared by runs: start it empty
            async with database.engine.begin() as conn:
                await conn.run_sync(Base.metadata.drop_all)
                await conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
        await upgrade_database(database)
        async with database.sessionmaker() as session:
            roles = itertools.cycle([Role.user, Role.analyst, Role.admin])
            accounts = [(i, f"victim{i}", next(roles)) for i in VICTIMS]
            accounts += [(uid, f"acting-{role.value}", role) for role, uid in ACTING.items()]
            accounts += [(uid, f"disposable{uid}", Role.user) for uid in DISPOSABLE]
            for uid, name, role in accounts:
                session.add(
                    User(
                        id=uid,
                        email=f"{name}@example.com",
                        username=name,
                        full_name=name,
                        hashed_password=PASSWORD_HASH,
                        role=role.value,
                        is_active=True,
                        token_version=0,
                    )
                )
            await session.commit()
        if not database.is_sqlite:  # ids were given by hand: move the sequence past them
            async with database.engine.begin() as conn:
                await conn.exec_driver_sql(
                    "SELECT setval(pg_get_serial_sequence('users', 'id'), (SELECT max(id) FROM users))"
                )
    finally:
        await database.dispose()


def _token(settings: Settings, user_id: int) -> str:
    return auth.create_access_token(user_id, 0, settings.secret_key, 60)[0]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fuzz_env(tmp_path_factory, request):
    from schemathesis.python import asgi

    from generate_dataset import generate

    root: Path = tmp_path_factory.mktemp("fuzz")
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{root / 'fuzz.db'}"
    else:
        url = postgres_url()
        if url is None:
            pytest.skip("PostgreSQL run: set TEST_DATABASE_URL")
    settings = make_settings(
        root, url, login_max_failures_per_user=10**6, login_max_failures_per_ip=10**6, db_busy_timeout_seconds=30
    )
    settings.data_path.parent.mkdir(parents=True, exist_ok=True)
    generate(rows=300, seed=11).to_csv(settings.data_path, index=False)
    asyncio.run(_seed(settings))
    app = create_app(settings)
    assert app.openapi() == SPEC, "the fuzzed schema must be the served one"
    # Schemathesis runs the app (and its lifespan) on its own event loop thread.
    with asgi.get_client(app) as client:
        trained = client.post(
            "/train",
            params={"n_clusters": 4},
            headers={"Authorization": f"Bearer {_token(settings, ACTING[Role.admin])}"},
        )
        assert trained.status_code == 200, trained.text
    env = {"app": app, "settings": settings, "disposable": iter(DISPOSABLE), "backend": request.param}
    yield env
    asgi.shutdown_lifespans()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        _report(reporter, capture, request.param)
    EXAMPLES.clear()
    STATUSES.clear()


def _report(reporter, capture, backend: str) -> None:
    """Operation and example counts in the pytest output, past output capturing."""
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for role in ("user", "admin"):
            ops = {op for r, op in EXAMPLES if r == role}
            total = sum(n for (r, _), n in EXAMPLES.items() if r == role)
            reporter.write_line(f"schemathesis on {backend} as {role}: {len(ops)} operations, {total} examples")
        reporter.write_line(
            f"schemathesis on {backend}, statuses: "
            + ", ".join(f"{role} {code}: {n}" for (role, code), n in sorted(STATUSES.items()))
        )


def _served_spec() -> dict:
    """The OpenAPI document of an app that is never started (no database, no files touched)."""
    template = make_settings(Path("/nonexistent-fuzz-template"), "sqlite+aiosqlite:///:memory:")
    return create_app(template).openapi()


SPEC = _served_spec()
# One pytest item per operation; each call is sent to the module's running app (`app=` below).
schema = schemathesis.openapi.from_dict(SPEC)
FUZZ_SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)


def _headers_for(case, role: Role, env) -> dict[str, str]:
    settings = env["settings"]
    method, path = case.operation.method.upper(), case.operation.path
    if (method, path) == ("DELETE", "/users/me"):
        user_id = next(env["disposable"], DISPOSABLE[-1])
    else:
        user_id = ACTING[role]
    # Logout revokes the token it is sent with: a fresh one of the same account keeps the run's own alive.
    return {"Authorization": f"Bearer {_token(settings, user_id)}"}


# Operations where a request the schema allows may still break a documented rule the schema cannot
# express; a 422 there is the right answer, not a rejected valid request.
SEMANTIC_422 = {
    "GET /elbow": "k_min must not exceed k_max",
    "POST /train": "the uploaded file must be a CSV with the customer columns",
    "POST /predict/batch": "the uploaded file must be a CSV with the customer columns",
    "PUT /users/me": "a new password needs the right current_password; no email on a reserved domain",
    "POST /auth/register": "no email on a reserved domain (.test, .invalid, .localhost, ...)",
    "POST /segmentations": "declarations across fields: min <= max, features by kind, names unique in any case",
    "POST /sources": "a path under SOURCE_ROOT (unset here), a host that resolves to global addresses, one SELECT",
    "POST /segmentations/{name}/train": "the uploaded file must be a CSV with the segmentation's columns",
    "POST /segmentations/{name}/predict": "the customer must follow the segmentation's own schema",
    "POST /segmentations/{name}/predict/batch": "customers or a CSV, following the segmentation's own schema",
    "GET /segmentations/{name}/elbow": "k_min must not exceed k_max",
    "POST /models/compare": "the uploaded file must be a CSV with the customer columns",
    "POST /segmentations/{name}/compare": "the uploaded file must be a CSV with the segmentation's columns",
    "POST /webhooks": "the URL's host must resolve, to global addresses only",
    "PATCH /webhooks/{webhook_id}": "the URL's host must resolve, to global addresses only",
    "POST /segmentations/{name}/runs": "a file of the segmentation's columns with unique ids, or a known source",
}


def _run(case, role: Role, env) -> None:
    excluded = [positive_data_acceptance] if case.operation.label in SEMANTIC_422 else None
    response = case.call_and_validate(headers=_headers_for(case, role, env), app=env["app"], excluded_checks=excluded)
    EXAMPLES[(role.value, case.operation.label)] += 1
    STATUSES[(role.value, response.status_code)] += 1
    if response.status_code < 300:
        SUCCESSES.add((env["backend"], role.value, case.operation.label))
    assert "Traceback" not in response.text


@schema.parametrize()
@FUZZ_SETTINGS
@hypothesis.seed(SEED)
def test_fuzz_as_user(case, fuzz_env):
    _run(case, Role.user, fuzz_env)


@schema.parametrize()
@FUZZ_SETTINGS
@hypothesis.seed(SEED)
def test_fuzz_as_admin(case, fuzz_env):
    _run(case, Role.admin, fuzz_env)


def test_the_fuzzing_reached_the_trained_model():
    """Runs after the tests above: generated requests got through to the model, not only to 4xx."""
    backends = {backend for backend, _, _ in SUCCESSES}
    if not backends:
        pytest.skip("the fuzz tests did not run in this session")
    for backend in backends:
        for label in (
            "POST /predict",
            "POST /predict/batch",
            "GET /clusters",
            "GET /charts/clusters",
            "GET /history",
            "POST /profiles/",
            "GET /elbow",
        ):
            for role in ("user", "admin"):
                assert (backend, role, label) in SUCCESSES, (backend, role, label)
        for label in ("GET /admin/stats", "GET /models", "GET /admin/users"):
            assert (backend, "admin", label) in SUCCESSES, (backend, label)
