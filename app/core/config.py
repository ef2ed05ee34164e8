"""Service settings: one object, read from the environment and `.env`."""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger("app.core.config")

# The placeholder shipped in .env.example; production refuses it.
EXAMPLE_SECRET_KEY = "change-me-to-a-long-random-string-of-at-least-32-chars"
MIN_PRODUCTION_SECRET_LENGTH = 32
DEFAULT_SQLITE_URL = "sqlite+aiosqlite:///./customer_segmentation.db"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    app_env: Literal["development", "production"] = "development"
    secret_key: str = ""
    # Where a generated development key is kept so restarts keep sessions valid.
    secret_key_file: Path = Path(".secret_key")
    algorithm: Literal["HS256"] = "HS256"
    access_token_expire_minutes: int = Field(default=60, ge=1, le=60 * 24 * 30)

    database_url: str = DEFAULT_SQLITE_URL
    # SQLite: how long a write waits for another connection's lock before the request gets 503.
    db_busy_timeout_seconds: float = Field(default=15, gt=0, le=600)
    # PostgreSQL: connections each worker keeps open (and up to half as many more for bursts).
    db_pool_size: int = Field(default=20, ge=1, le=500)
    # PostgreSQL: how long a request waits for a free pooled connection before it gets 503.
    db_pool_timeout_seconds: float = Field(default=30, gt=0, le=600)
    cors_origins: str = "http://localhost:5173,http://localhost:3000"

    model_dir: Path = Path("models")
    data_path: Path = Path("data/customers.csv")

    bcrypt_rounds: int = Field(default=12, ge=4, le=16)

    # Login throttling: failures per username and per client address in a window.
    login_max_failures_per_user: int = Field(default=5, ge=1)
    login_max_failures_per_ip: int = Field(default=20, ge=1)
    login_window_seconds: int = Field(default=300, ge=1)

    # Request and work limits.
    max_upload_mb: float = Field(default=50, gt=0)
    # Training uploads (POST .../train with a file) have a cap of their own: training sets are big.
    max_train_upload_mb: float = Field(default=1024, gt=0)
    # Training files (Parquet, or CSV uploads above 256 MB) with more rows than this are trained out of
    # core: k chosen on a sample of TRAIN_SAMPLE_ROWS rows, then K-Means refined over the file in chunks.
    train_in_memory_rows: int = Field(default=5_000_000, ge=1000)
    train_sample_rows: int = Field(default=200_000, ge=1000, le=5_000_000)
    # Named segmentations that may exist at once (`default` included).
    max_segmentations: int = Field(default=100, ge=1, le=10_000)
    max_json_body_mb: float = Field(default=10, gt=0)
    max_batch_rows: int = Field(default=10_000, ge=1)
    train_timeout_seconds: float = Field(default=300, gt=0)
    # Training jobs (POST .../train?wait=false): how often the worker running one says it is alive
    # (and looks for a cancel from another worker), and after how long without that it counts as gone.
    job_heartbeat_seconds: float = Field(default=2.0, gt=0, le=60)
    job_stale_seconds: float = Field(default=30.0, gt=0, le=3600)
    # Where a job keeps its upload until it ends; empty: a folder in the system's temporary directory.
    job_dir: str = ""

    # Data sources (app.sources). File sources and SQLite sources are paths under source_root (unset:
    # both are refused). A PostgreSQL source's host must resolve to global addresses only, unless
    # source_allow_private (a database on this machine or a closed network). Each statement a source
    # runs is cancelled past source_statement_timeout_seconds.
    source_root: Path | None = None
    source_allow_private: bool = False
    source_statement_timeout_seconds: float = Field(default=60, gt=0, le=24 * 3600)

    # How often a worker checks the database for another active model version.
    model_sync_seconds: float = Field(default=1.0, gt=0)
    # How long a worker may trust its cached view of a user and its revoked tokens.
    auth_cache_seconds: float = Field(default=0.5, ge=0, le=1.0)

    # Drift: every scored customer is counted per model version in memory, and each worker writes
    # its counts to the database every drift_flush_seconds (and when it stops), into buckets of
    # drift_bucket_seconds (how finely `since` is honoured). drift_gauge_seconds: how often the
    # segmentation_feature_psi gauge is recomputed for the active versions.
    drift_enabled: bool = True
    drift_flush_seconds: float = Field(default=5.0, gt=0, le=300)
    drift_bucket_seconds: int = Field(default=60, ge=1, le=86_400)
    drift_gauge_seconds: float = Field(default=60.0, gt=0)

    metrics_enabled: bool = True
    # When set, GET /metrics answers only requests with `Authorization: Bearer <metrics_token>`.
    metrics_token: str = ""
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    # How often the request log lines queued in a worker are written out (at most a second).
    log_flush_seconds: float = Field(default=0.2, gt=0, le=1.0)

    # Webhooks (app.webhooks). An attempt delivers when the endpoint answers 2xx within
    # webhook_timeout_seconds; after each failed one the next waits the schedule's next delay (seconds,
    # separated by commas), and past the last the message is `failed`. webhook_allow_private lets
    # endpoints be loopback or private addresses (tests, a closed network). Each worker looks for due
    # deliveries every webhook_poll_seconds (at once when it queued one itself), sending up to
    # webhook_concurrency at a time. One worker, whichever is first, checks every segmentation's drift
    # status every drift_check_minutes and sends drift.changed when it moved.
    webhook_timeout_seconds: float = Field(default=10, gt=0, le=300)
    webhook_retry_schedule: str = "5,300,1800,7200,18000,36000"
    webhook_allow_private: bool = False
    webhook_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    webhook_concurrency: int = Field(default=32, ge=1, le=1000)
    drift_check_minutes: float = Field(default=15, gt=0, le=7 * 24 * 60)
    # Retraining policies (app.policies). Each worker looks for due schedules every policy_tick_seconds;
    # a drift trigger fires again only after drift_retrain_cooldown_hours. A test configuration
    # (testing=true) may set the scheduler's clock: the ISO time written in test_scheduler_clock_file.
    policy_tick_seconds: float = Field(default=30, gt=0, le=3600)
    drift_retrain_cooldown_hours: float = Field(default=24, ge=0, le=24 * 365)
    testing: bool = False
    test_scheduler_clock_file: Path | None = None

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, url: str) -> str:
        return normalize_database_url(url)

    @field_validator("cors_origins")
    @classmethod
    def _no_wildcard_origin(cls, origins: str) -> str:
        # Credentials (the Authorization header) are allowed cross-origin, so every origin must be named.
        if "*" in origins:
            raise ValueError('CORS_ORIGINS must name each origin (e.g. http://localhost:5173); "*" is refused')
        return origins

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _retry_schedule(cls, schedule: str) -> str:
        try:
            delays = [float(part) for part in schedule.split(",") if part.strip()]
        except ValueError:
            raise ValueError("WEBHOOK_RETRY_SCHEDULE must be seconds separated by commas, e.g. 5,300,1800") from None
        if any(delay < 0 or delay != delay for delay in delays):
            raise ValueError("WEBHOOK_RETRY_SCHEDULE delays must be 0 or more seconds")
        return schedule

    @field_validator("source_root", mode="before")
    @classmethod
    def _unset_when_empty(cls, root: object) -> object:
        # SOURCE_ROOT= in .env means no root, not the working directory.
        return None if isinstance(root, str) and not root.strip() else root

    @model_validator(mode="after")
    def _check_secret(self) -> Settings:
        if self.app_env == "production":
            if not self.secret_key or self.secret_key == EXAMPLE_SECRET_KEY:
                raise ValueError("SECRET_KEY must be set to your own value when APP_ENV=production")
            if len(self.secret_key) < MIN_PRODUCTION_SECRET_LENGTH:
                raise ValueError(
                    f"SECRET_KEY must be at least {MIN_PRODUCTION_SECRET_LENGTH} characters when APP_ENV=production"
                )
        elif not self.secret_key:
            self.secret_key = _development_secret(self.secret_key_file)
        return self

    @model_validator(mode="after")
    def _job_timing(self) -> Settings:
        if self.job_stale_seconds <= self.job_heartbeat_seconds:
            raise ValueError("JOB_STALE_SECONDS must be longer than JOB_HEARTBEAT_SECONDS")
        return self

    @property
    def job_directory(self) -> Path:
        return Path(self.job_dir) if self.job_dir else Path(tempfile.gettempdir()) / "segmentation-jobs"

    @property
    def webhook_retry_delays(self) -> list[float]:
        return [float(part) for part in self.webhook_retry_schedule.split(",") if part.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_train_upload_bytes(self) -> int:
        return int(self.max_train_upload_mb * 1024 * 1024)

    @property
    def max_json_body_bytes(self) -> int:
        return int(self.max_json_body_mb * 1024 * 1024)


def normalize_database_url(url: str) -> str:
    """Accept the sync spellings users know and pick the async driver."""
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    if url.startswith("postgres://"):
        return "postgresql+asyncpg://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        return "postgresql+asyncpg://" + url[len("postgresql://") :]
    if url.startswith("postgresql+psycopg2://"):
        return "postgresql+asyncpg://" + url[len("postgresql+psycopg2://") :]
    return url


def _development_secret(path: Path) -> str:
    try:
        existing = path.read_text().strip()
    except OSError:
        existing = ""
    if existing:
        return existing
    key = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key)
        logger.warning("SECRET_KEY is not set: generated a development key and kept it in %s", path)
    except FileExistsError:
        # Another worker process wrote it first; use theirs.
        return path.read_text().strip() or key
    except OSError:
        logger.warning("SECRET_KEY is not set and %s is not writable: tokens end at restart", path)
    return key


@lru_cache
def get_settings() -> Settings:
    return Settings()
