"""Create the app: lifespan (tables, the active model), routers, error handlers."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from app.admin import endpoints as admin
from app.auth import endpoints as auth
from app.auth.service import AuthCache
from app.core.config import Settings, get_settings
from app.core.database import Database
from app.core.docs import install_docs
from app.core.errors import ML_ERROR_STATUS, AppError, ml_error_body
from app.core.middleware import ServiceMiddleware, document_body_limit, hardening_headers
from app.core.migrations import upgrade_database
from app.core.observability import configure_logging, install_observability
from app.core.routing import install_json_alternatives
from app.core.schemas import Health
from app.customers import endpoints as customer_routes
from app.customers.service import CustomerBase
from app.history.storage import open_history_repository
from app.jobs import endpoints as jobs
from app.jobs.service import JobRunner
from app.ml.errors import MLError
from app.policies import endpoints as policy_routes
from app.policies.service import PolicyService
from app.profiles import endpoints as profiles
from app.segmentations import endpoints as segmentation_routes
from app.segmentations import legacy as seed_routes
from app.segmentations.elbow import ElbowCache
from app.segmentations.registry import SegmentationRegistry
from app.segmentations.service import SegmentationTrainer, Services
from app.sources import endpoints as sources
from app.users import endpoints as users
from app.users import registration
from app.versions import endpoints as version_routes
from app.versions.drift import DriftCounter, refresh_gauges
from app.versions.drift_watch import DriftWatch
from app.versions.store import ModelStore
from app.webhooks import endpoints as webhooks
from app.webhooks.crypto import SecretBox
from app.webhooks.delivery import DeliveryWorker
from app.webhooks.outbox import Outbox
from app.webhooks.service import WebhookService

API_VERSION = "1.0.0"
logger = logging.getLogger("app")


def _error(status_code: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code, headers=headers)


def _busy() -> JSONResponse:
    return _error(503, "The database is busy; try again shortly", {"Retry-After": "1"})


def _unavailable() -> JSONResponse:
    return _error(503, "The database is unavailable", {"Retry-After": "5"})


# SQLite's result codes (sqlite3's `sqlite_errorname`) for another connection holding a lock.
_SQLITE_BUSY = ("SQLITE_BUSY", "SQLITE_LOCKED")
# PostgreSQL's SQLSTATEs for a server that is overloaded or a statement that lost a race: try again soon.
_PG_BUSY = {"40001", "40P01", "55P03", "53300", "57014"}
# SQLSTATE classes of a server that cannot be reached or is going away: 08 connection, 53 resources, 57 operator.
_PG_UNAVAILABLE = ("08", "53", "57")


def database_error_response(exc: Exception) -> JSONResponse | None:
    """The answer to a database failure, told apart by exception type and the driver's error code.

    None for a failure that is a defect of ours (a 500). PEP 249's OperationalError is the driver
    saying the database could not do its part (a file it cannot open, a lost connection), so it is
    an outage unless its code says the database is only busy.
    """
    if isinstance(exc, PoolTimeout):  # every pooled connection is in use
        return _busy()
    if not isinstance(exc, DBAPIError):
        return None
    orig = exc.orig
    sqlstate = str(getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or "")
    sqlite_name = str(getattr(orig, "sqlite_errorname", None) or "")
    if sqlite_name.startswith(_SQLITE_BUSY) or sqlstate in _PG_BUSY:
        return _busy()
    if sqlstate.startswith("22"):
        # A data exception (e.g. a NUL character in text, which PostgreSQL cannot store) comes from the request.
        return _error(422, "A value cannot be stored (text may not contain NUL characters)")
    if isinstance(exc, IntegrityError):
        # The services check uniqueness first; a row written meanwhile by another request ends here.
        return _error(409, "The request conflicts with data stored meanwhile; try again")
    if sqlstate.startswith(_PG_UNAVAILABLE) or isinstance(exc, OperationalError):
        return _unavailable()
    return None


# Where FastAPI says a field came from: the rest of its `loc` names the field.
_SOURCES = ("body", "query", "path", "header", "cookie")


def _field_name(loc: Sequence[str | int]) -> str:
    """`loc` after its source, joined with dots (`customers.3.age`); the source alone for a whole body."""
    where = loc[1:] if len(loc) > 1 and loc[0] in _SOURCES else loc
    return ".".join(str(part) for part in where) or "body"


def _broken_rule(error: Mapping[str, Any]) -> str:
    name, msg = _field_name(error["loc"]), error["msg"]
    if error["type"] == "json_invalid" and len(error["loc"]) == 2 and isinstance(error["loc"][1], int):
        # FastAPI's own decode error puts the character offset in `loc` and the reason in `ctx`.
        reason = (error.get("ctx") or {}).get("error")
        return f"body: {msg}{f' ({reason})' if reason else ''} at character {error['loc'][1]}"
    return f"{name}: {msg}"


def invalid_request(errors: Sequence[Mapping[str, Any]]) -> JSONResponse:
    """422 for broken field rules: `detail` one sentence naming each field and its rule, `errors` the
    list as FastAPI has it without `input` (it could echo a password), `ctx` or `url`."""
    rules = list(dict.fromkeys(_broken_rule(error) for error in errors))
    fields = [{"type": error["type"], "loc": list(error["loc"]), "msg": error["msg"]} for error in errors]
    detail = "; ".join(rules) or "The request breaks a field rule"
    return JSONResponse({"detail": detail, "errors": fields}, status_code=422)


def _allowed_methods(request: Request) -> str:
    """Every method served at this path (a 405 from one route would name only its own)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    methods.discard("HEAD")  # implied by GET, not documented apart
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    """One handler per kind of failure: every `detail` is a string; a broken field rule adds `errors`."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # Only a body Starlette or FastAPI could not read (undecodable JSON, a multipart without a
            # boundary) ends up here: the same answer as any other malformed body, 422 naming the body.
            return invalid_request([{"type": "body_unreadable", "loc": ("body",), "msg": str(exc.detail)}])
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return _error(exc.status_code, str(exc.detail), headers)

    @app.exception_handler(AppError)
    async def app_error(_: Request, exc: AppError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(MLError)
    async def ml_error(_: Request, exc: MLError) -> JSONResponse:
        return JSONResponse(ml_error_body(exc), status_code=ML_ERROR_STATUS)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid_request(exc.errors())

    async def database_error(_: Request, exc: Exception) -> JSONResponse:
        response = database_error_response(exc)
        if response is None:
            logger.exception("database error", exc_info=exc)
            return _error(500, "Internal server error")
        if response.status_code == 503:
            logger.warning("database unavailable: %s", getattr(exc, "orig", None) or exc)
        return response

    app.add_exception_handler(DBAPIError, database_error)
    app.add_exception_handler(PoolTimeout, database_error)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        response = database_error_response(exc)
        if response is None:
            logger.exception("unhandled error", exc_info=exc)
            response = _error(500, "Internal server error")
        # Starlette sends this from its outermost middleware, past ours: add what they would have.
        response.headers.update(hardening_headers(request.scope))
        origin = request.headers.get("origin")
        if origin and origin in request.app.state.settings.cors_origin_list:
            response.headers.update(
                {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true", "Vary": "Origin"}
            )
        return response


_frozen = False


def _freeze_startup_objects() -> None:
    """Exempt what start-up loaded (NumPy, pandas, scikit-learn, the ORM) from garbage collection.

    A full collection walks every one of those objects with the service stalled, which was most
    of its tail latency under load. Once per process is enough.
    """
    global _frozen
    if not _frozen:
        gc.collect()
        gc.freeze()
        _frozen = True


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        database = Database(
            settings.database_url,
            busy_timeout=settings.db_busy_timeout_seconds,
            pool_size=settings.db_pool_size,
            pool_timeout=settings.db_pool_timeout_seconds,
        )
        await upgrade_database(database)
        app.state.database = database
        # Webhooks: the outbox every domain queues events into, and this worker's share of sending them.
        box = SecretBox(settings.secret_key)
        deliveries = DeliveryWorker(database=database, settings=settings, box=box)
        app.state.events = events = Outbox(on_commit=deliveries.wake)
        app.state.webhooks = WebhookService(database=database, settings=settings, box=box, on_queued=deliveries.wake)
        app.state.models = ModelStore(settings=settings, database=database, metrics=app.state.metrics, events=events)
        app.state.segmentations = SegmentationRegistry(
            settings=settings, database=database, default=app.state.models, metrics=app.state.metrics
        )
        await app.state.models.start()
        await app.state.segmentations.start()
        app.state.drift = drift = DriftCounter(
            database=database, settings=settings, metrics=app.state.metrics, enabled=settings.drift_enabled
        )
        await drift.start(lambda: refresh_gauges(drift, app.state.segmentations.stores))
        history = open_history_repository(database, busy_timeout=settings.db_busy_timeout_seconds)
        await history.start()
        app.state.services = services = Services(
            settings=settings,
            database=database,
            segmentations=app.state.segmentations,
            elbow=ElbowCache(settings),
            drift=drift,
            history=history,
            metrics=app.state.metrics,
            events=events,
        )
        app.state.jobs = JobRunner(
            trainer=SegmentationTrainer(services), settings=settings, database=database, metrics=app.state.metrics
        )
        await deliveries.start()
        app.state.deliveries = deliveries
        drift_watch = DriftWatch(
            database=database,
            counter=drift,
            stores=app.state.segmentations.stores,
            events=events,
            interval_seconds=settings.drift_check_minutes * 60,
        )
        app.state.customers = CustomerBase(settings=settings, database=database, events=services.events)
        await app.state.customers.start()
        app.state.policies = policy_service = PolicyService(
            settings=settings,
            database=database,
            registry=app.state.segmentations,
            jobs=app.state.jobs,
            customers=app.state.customers,
            events=events,
            metrics=app.state.metrics,
        )
        drift_watch.on_move = policy_service.drift_moved
        app.state.jobs.on_settled.append(policy_service.job_settled)
        await app.state.jobs.start()  # after the hook: a fire whose worker was killed gets its event
        if settings.drift_enabled:
            await drift_watch.start()
        await policy_service.start()
        _freeze_startup_objects()
        try:
            yield
        finally:
            await policy_service.stop()
            await drift_watch.stop()
            await deliveries.stop()
            await app.state.jobs.stop()
            await app.state.customers.stop()
            await history.stop()
            try:
                await drift.stop()  # the last counts, so a clean shutdown loses none
            except Exception:  # noqa: BLE001 - a database gone at shutdown must not stop the rest
                logging.getLogger("app.drift").warning("drift counts not written at shutdown", exc_info=True)
            await app.state.segmentations.stop()
            await app.state.models.stop()
            await database.dispose()

    app = FastAPI(
        title="Customer Segmentation API",
        version=API_VERSION,
        description=(
            "Groups customers into segments with K-Means. Log in through **Authorize** "
            "(username or email and password), then train, predict and manage profiles."
        ),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        # Swagger shows the groups in this order, whatever order the routers are matched in.
        openapi_tags=[
            {"name": name}
            for name in (
                "health",
                "auth",
                "users",
                "profiles",
                "admin",
                "segmentation",
                "segmentations",
                "jobs",
                "webhooks",
                "customers",
                "policies",
                "sources",
            )
        ],
    )
    app.state.settings = settings
    app.state.auth_cache = AuthCache(ttl=settings.auth_cache_seconds)

    # FastAPI tries routes one by one, at a cost for each route tried: the segmentation routes,
    # which carry the traffic, come first, then the health check, the rest of the API, and last
    # the docs and /metrics. The routers' routes join the app's own list: `include_router` would
    # keep each router nested, matched route by route and then again inside (docs/performance.md
    # has the figures), and would add nothing here, as a router's prefix, tags, responses and
    # dependencies are on its routes from the moment they are made.
    app.router.routes.extend(seed_routes.router.routes)
    app.router.routes.extend(segmentation_routes.router.routes)
    app.router.routes.extend(version_routes.router.routes)
    # A named segmentation's predict is as hot as /predict: it is tried right after it.
    named_predict = next(r for r in app.router.routes if getattr(r, "path", "") == "/segmentations/{name}/predict")
    app.router.routes.remove(named_predict)
    seed_predict = next(i for i, r in enumerate(app.router.routes) if getattr(r, "path", "") == "/predict")
    app.router.routes.insert(seed_predict + 1, named_predict)

    @app.get(
        "/",
        tags=["health"],
        summary="Health check",
        description="Whether the service is up and which model version it serves.",
    )
    async def health(request: Request) -> Health:
        model = request.app.state.models.current
        return Health(
            version=API_VERSION,
            model_loaded=model is not None,
            model_version=model.version if model is not None else None,
        )

    modules = (registration, auth, users, profiles, admin, jobs, webhooks, customer_routes, policy_routes, sources)
    for module in modules:
        app.router.routes.extend(module.router.routes)

    metrics = install_observability(app, settings)
    app.add_middleware(
        ServiceMiddleware,
        metrics=metrics,
        cors_origins=settings.cors_origin_list,
        upload_limit=settings.max_upload_bytes,
        train_upload_limit=settings.max_train_upload_bytes,
        json_limit=settings.max_json_body_bytes,
    )
    document_body_limit(app)
    install_json_alternatives(app)
    install_error_handlers(app)
    install_docs(app)
    return app


app = create_app()
