"""One typed settings object for every Crucible process (API, scheduler, worker, CLI).

Every field reads from an environment variable prefixed ``CRUCIBLE_`` (e.g. ``CRUCIBLE_DATABASE_URL``).
The defaults describe the *embedded* stack: SQLite, a serverless SQL broker, a local S3 server and a
local MLflow store, all under ``CRUCIBLE_HOME``. The real-services deployment (compose, k8s, tests)
sets the URLs to Postgres, Redis, MinIO and an MLflow tracking server; the code path is the same.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Placeholder secrets are fine on a laptop and dangerous anywhere else.
PLACEHOLDER_SECRETS = {"changeme", "changethis", "crucible-dev-secret", "minioadmin"}


def default_home() -> Path:
    return Path(os.environ.get("CRUCIBLE_HOME", Path.cwd() / ".crucible")).resolve()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRUCIBLE_", env_ignore_empty=True, extra="ignore")

    ENV: Literal["dev", "test", "prod"] = "dev"
    HOME: Path = Field(default_factory=default_home)

    # --- persistence and broker ---------------------------------------------------------------
    DATABASE_URL: str = ""
    BROKER_URL: str = ""
    DB_POOL_SIZE: int = 5
    # Fail soft: every dependency call is bounded, so an outage is a 503 within seconds, not a hung request.
    DB_CONNECT_TIMEOUT_SECONDS: int = 3
    DB_STATEMENT_TIMEOUT_SECONDS: float = 30.0
    DB_POOL_TIMEOUT_SECONDS: float = 5.0
    S3_CONNECT_TIMEOUT_SECONDS: float = 3.0
    S3_READ_TIMEOUT_SECONDS: float = 10.0  # per socket read: a frozen S3 server is an error within this
    MLFLOW_TIMEOUT_SECONDS: float = 10.0
    BROKER_TIMEOUT_SECONDS: float = 3.0
    READY_TIMEOUT_SECONDS: float = 3.0  # /readyz answers within this, whatever hangs
    RETRY_AFTER_SECONDS: int = 5  # the Retry-After of a 503 while a dependency is down
    API_KEY_CACHE_SECONDS: float = 5.0  # a revoked key stops working within this
    # Access log: "errors" logs 5xx and slow requests only (cheap), "all" every request, "off" nothing.
    ACCESS_LOG: Literal["off", "errors", "all"] = "errors"
    SLOW_REQUEST_SECONDS: float = 1.0

    # --- object storage (any S3 endpoint; MinIO in deployment, SeaweedFS embedded) -------------
    S3_ENDPOINT: str = "127.0.0.1:8333"
    S3_PUBLIC_ENDPOINT: str | None = None  # host:port clients use for presigned URLs, if different
    S3_ACCESS_KEY: str = "crucible"
    S3_SECRET_KEY: SecretStr = SecretStr("crucible-dev-secret")
    S3_SECURE: bool = False
    S3_REGION: str = "us-east-1"
    S3_BUCKET: str = "crucible"

    # --- tracking -----------------------------------------------------------------------------
    MLFLOW_TRACKING_URI: str = ""
    PUBLIC_URL: str = "http://127.0.0.1:8000"  # where run pages link back to

    # --- job path timing ----------------------------------------------------------------------
    LEASE_SECONDS: float = 60.0
    HEARTBEAT_SECONDS: float = 10.0
    SCHEDULER_INTERVAL_SECONDS: float = 1.0
    # Touched by every scheduler cycle; `crucible probe scheduler` reads its age to catch a hung loop.
    SCHEDULER_ALIVE_FILE: Path = Path("/tmp/crucible-scheduler.alive")
    REDISPATCH_AFTER_SECONDS: float = 300.0  # a dispatched job nobody claimed is published again
    QUEUE_WINDOW: int = 2  # messages allowed in flight per queue; the rest wait, ordered by priority
    CANCEL_GRACE_SECONDS: float = 30.0
    POLL_SECONDS: float = 1.0  # supervisor: lease renewal and cancel-flag poll interval
    EVENT_FLUSH_SECONDS: float = 2.0  # supervisor: events to Postgres and metrics to MLflow, batched this often
    # Operator's ceiling on a spec's retries.infra: one bad spec must not crash-loop a GPU node 100 times.
    MAX_INFRA_RETRIES: int = Field(10, ge=0)

    # --- scheduling: pools, quotas, fair share (services/scheduler/admission.py, README "Scheduling") ---------
    # GPU pools per worker kind: "<worker kind>.<gpu class>" -> GPUs it offers, e.g. '{"ssl-trainer.a100": 16,
    # "ssl-trainer.h100": 8}'. A pool's workers consume queue crucible.<worker kind>.<gpu class> (start them with
    # CRUCIBLE_WORKER_GPU_CLASS=<gpu class>). Jobs asking for GPUs of a kind with pools are admitted only where
    # that many GPUs of their class are free; other jobs keep the per-queue window (QUEUE_WINDOW).
    GPU_POOLS: dict[str, int] = Field(default_factory=dict)
    FAIR_SHARE: bool = True  # False: priority, then age, across projects (no usage term)
    FAIR_SHARE_HALF_LIFE_SECONDS: float = Field(3600.0, gt=0)  # GPU-hours used this long ago count half
    # A GPU job that cannot start for this long reserves the pool nearest to fitting it: nothing else starts
    # there until it has (backfill stops on that pool, so a large job is never starved by small ones).
    RESERVE_AFTER_SECONDS: float = Field(900.0, ge=0)
    SCHEDULER_HEADS: int = Field(16, ge=1, le=1000)  # queued jobs read per project and worker kind each cycle
    # A GPU job that cannot start may stop lower-priority running jobs (SIGTERM -> checkpoint -> re-queue; they
    # resume later). Off by default.
    PREEMPTION: bool = False

    # --- webhooks (services/scheduler/webhooks.py) --------------------------------------------
    WEBHOOK_TIMEOUT_SECONDS: float = 5.0  # one POST, connect to last byte
    WEBHOOK_MAX_ATTEMPTS: int = Field(8, ge=1)  # then the delivery is marked failed (last_error kept)
    WEBHOOK_BATCH: int = Field(8, ge=1)  # POSTs in flight at once per scheduler (a thread each)
    WEBHOOK_BACKOFF_CAP_SECONDS: float = 600.0  # 2^attempts s (with jitter), at most this
    # Delivered and failed deliveries older than this are deleted by the scheduler (pending ones never); 0 keeps
    # them forever. Every job end writes one row per matching webhook, so without a limit the table only grows.
    WEBHOOK_RETENTION_DAYS: float = Field(30.0, ge=0)
    # Webhooks to loopback, private, link-local (the cloud metadata endpoint) or reserved addresses would let any
    # project make the scheduler call services inside the cluster. Refused in prod unless the operator allows them;
    # allowed in dev/test (a laptop's own receiver). None: decided by ENV.
    WEBHOOK_ALLOW_PRIVATE: bool | None = None

    @property
    def webhooks_may_reach_private(self) -> bool:
        return self.ENV != "prod" if self.WEBHOOK_ALLOW_PRIVATE is None else self.WEBHOOK_ALLOW_PRIVATE

    # --- workers ------------------------------------------------------------------------------
    WORKER_TORCH_THREADS: int = 0  # 0: let torch decide
    WORK_DIR: Path | None = None  # per-job scratch space; defaults to HOME/work
    DATA_CACHE_DIR: Path | None = None  # downloaded datasets, keyed by sha256
    WARM_CHILD: bool = True  # pre-start the next job's child (torch and methods imported); False: cold per job
    LOCAL_CACHE: bool = True  # builtin datasets and random-init k-NN baselines cached under DATA_CACHE_DIR
    # Share of training wall time that intermediate checkpoints (serialise + hash + upload) may take: a checkpoint
    # costing 1 s is stored at most every 20 s at 0.05. The first, the final and a preemption's are always
    # stored; 1.0 stores every one (the tests, which kill jobs at chosen epochs).
    CHECKPOINT_DUTY: float = Field(0.05, gt=0, le=1)

    # --- uploads ------------------------------------------------------------------------------
    MAX_UPLOAD_BYTES: int = 2 * 1024**3
    MAX_ARCHIVE_FILES: int = 200_000
    MAX_ARCHIVE_UNPACKED_BYTES: int = 8 * 1024**3
    MAX_GPUS_PER_JOB: int = 8

    # --- input bounds and tenant storage (services/api/limits.py, services/datasets) ----------
    MAX_REQUEST_BYTES: int = 1024**2  # any body that is not a dataset upload (JSON specs are a few kB)
    MAX_ARCHIVE_RATIO: float = 100.0  # unpacked bytes per archive byte; above it the upload is a bomb
    MAX_CONCURRENT_INSPECTIONS: int = 2  # archive inspections at once per API process; more get 503
    # Extra to the grants in the storage_grants table (`crucible admin grant-storage`): project name ->
    # ["s3://bucket/prefix/", ...] it may register datasets inside, e.g. '{"vision": ["s3://lab-data/vision/"]}'.
    STORAGE_GRANTS: dict[str, list[str]] = Field(default_factory=dict)
    # Never registrable, whatever is granted (besides the platform bucket's cas/ and mlflow-artifacts/).
    RESERVED_STORAGE: list[str] = Field(default_factory=lambda: ["s3://mlflow/"])
    SSE_MAX_SECONDS: float = 3600.0  # an event stream ends after this long; clients reconnect with Last-Event-ID

    @field_validator("DATABASE_URL")
    @classmethod
    def _normalise_db_url(cls, v: str) -> str:
        # SQLAlchemy 2 maps postgresql:// to psycopg 3 already; postgres:// is a common alias it rejects.
        if v.startswith("postgres://"):
            v = "postgresql+psycopg://" + v.removeprefix("postgres://")
        return v

    @field_validator("GPU_POOLS")
    @classmethod
    def _pools(cls, v: dict[str, int]) -> dict[str, int]:
        import re

        for key, gpus in v.items():
            kind, dot, gpu_class = key.rpartition(".")
            if not dot or not kind or not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", gpu_class) or gpu_class == "any":
                raise ValueError(f"pool {key!r} must be '<worker kind>.<gpu class>' (class: lowercase letters, "
                                 "digits, '_' or '-', not 'any'), e.g. 'ssl-trainer.a100'")
            if gpus < 1:
                raise ValueError(f"pool {key!r} must offer at least 1 GPU, not {gpus}")
        return v

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        home = self.HOME
        if not self.DATABASE_URL:
            self.DATABASE_URL = f"sqlite:///{home / 'crucible.db'}"
        if not self.BROKER_URL:
            self.BROKER_URL = f"sqla+sqlite:///{home / 'broker.db'}"
        if not self.MLFLOW_TRACKING_URI:
            self.MLFLOW_TRACKING_URI = f"sqlite:///{home / 'mlflow.db'}"
        if self.WORK_DIR is None:
            self.WORK_DIR = home / "work"
        if self.DATA_CACHE_DIR is None:
            self.DATA_CACHE_DIR = home / "cache"
        if self.ENV == "prod" and self.S3_SECRET_KEY.get_secret_value() in PLACEHOLDER_SECRETS:
            raise ValueError(
                "CRUCIBLE_S3_SECRET_KEY is a placeholder; set a real secret (or CRUCIBLE_ENV=dev on a laptop)"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.DATABASE_URL.startswith("sqlite")

    @property
    def work_dir(self) -> Path:
        assert self.WORK_DIR is not None
        return self.WORK_DIR

    @property
    def data_cache_dir(self) -> Path:
        assert self.DATA_CACHE_DIR is not None
        return self.DATA_CACHE_DIR


@lru_cache
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests and the embedded launcher change the environment)."""
    get_settings.cache_clear()
