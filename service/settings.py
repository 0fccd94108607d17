"""Service settings: one pydantic-settings model read from ``XMAG_*`` variables (and ``REDIS_URL``).

The documented interface is ``REDIS_URL`` (no prefix: the usual name in container platforms),
``XMAG_API_KEYS`` (comma-separated; ``KEY`` has every scope, ``KEY:read`` is read-only),
``XMAG_SLIDE_ROOTS`` (comma-separated folders that by-reference slides must live under) and
``XMAG_DATA_DIR`` (slide store, results store and the embedded Redis's files). Everything else has a
named default below; times carry their unit in the name.

The engine's own variables (``XMAG_PROVIDERS``, ``XMAG_BATCH_SIZE``...) are read once, into
``ServiceSettings.engine`` (``xmag.settings.EngineSettings``): a worker builds its engine from it.
Both classes register with the settings root (``xmag.settings.check_environment``), which reports
``XMAG_*`` variables neither reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, PrivateAttr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from xmag.settings import EngineSettings, register_settings

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_MODEL_DIR", "ServiceSettings"]

#: The model package a worker loads when neither ``--model`` nor ``XMAG_MODEL_DIR`` names one: the
#: images' mount point (a checkout's ``make serve`` passes its demonstration package).
DEFAULT_MODEL_DIR = Path("/models/default")
#: Largest slide upload accepted (bytes): 20 GiB holds the largest single-file scans in practice.
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024**3
#: Wall-clock limit for one slide job (s). Dramatiq's 10-minute default is too short for big slides.
DEFAULT_JOB_TIME_LIMIT_S = 4 * 3600
#: Deliveries of one job to a worker (crash requeues included) before it is dead-lettered.
DEFAULT_MAX_ATTEMPTS = 3
#: Dramatiq's own default: a worker silent this long is dead and its messages are requeued (ms).
DEFAULT_HEARTBEAT_TIMEOUT_MS = 60_000
#: Chance per million broker commands of running queue maintenance (requeue of dead workers' work).
DEFAULT_MAINTENANCE_CHANCE = 1_000
#: A job lease not renewed for this long may be taken by another worker (ms).
DEFAULT_LEASE_MS = 60_000
#: How often a worker writes its heartbeat and renews its job lease (s).
DEFAULT_WORKER_HEARTBEAT_S = 5.0
#: A worker whose heartbeat is older than this is not counted by /readyz (s).
DEFAULT_WORKER_STALE_S = 30.0
#: How often the API looks for queued jobs whose message was lost (s); 0 turns it off.
DEFAULT_RECONCILE_INTERVAL_S = 30.0
#: A queued job untouched this long with no message is sent again (s).
DEFAULT_RECONCILE_AFTER_S = 60.0


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


@register_settings
class ServiceSettings(BaseSettings):
    """Everything the API and the workers read from the environment.

    Attributes:
        redis_url: Redis to use; ``None`` means ``xmag serve`` starts the embedded one.
        data_dir: root of ``slides/`` (upload store), ``results/`` (results store), ``redis/``.
        model_dir: the model package a worker loads once.
        api_keys: configured API keys in clear (hashed at startup, never stored in clear).
        slide_roots: folders by-reference slides must resolve under (after symlinks).
        max_upload_bytes: upload size cap (bytes); bigger uploads get 413 while streaming.
        public_url: base URL for Location headers and webhook bodies; ``None``: the request's.
        callback_allowed_hosts: hosts webhook callbacks may target (``lis.example.org``,
            ``*.example.org``, ``10.0.0.0/8``); empty: any host but link-local and metadata ones.
        webhook_secret: Standard Webhooks secret (``whsec_`` + base64); generated when unset.
        engine: the engine settings (their own ``XMAG_*`` variables), built once with these.
    """

    model_config = SettingsConfigDict(env_prefix="XMAG_", extra="ignore", populate_by_name=True)

    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "XMAG_REDIS_URL")
    )
    data_dir: Path = Path("var")
    model_dir: Path = DEFAULT_MODEL_DIR
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    slide_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    max_upload_bytes: int = Field(default=DEFAULT_MAX_UPLOAD_BYTES, gt=0)
    public_url: str | None = None
    webhook_secret: str | None = None
    webhook_max_retries: int = Field(default=8, ge=0)
    webhook_min_backoff_ms: int = Field(default=1_000, gt=0)
    webhook_max_backoff_ms: int = Field(default=600_000, gt=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    callback_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)

    job_time_limit_s: float = Field(default=DEFAULT_JOB_TIME_LIMIT_S, gt=0)
    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1)
    retry_min_backoff_ms: int = Field(default=5_000, gt=0)
    retry_max_backoff_ms: int = Field(default=300_000, gt=0)
    heartbeat_timeout_ms: int = Field(default=DEFAULT_HEARTBEAT_TIMEOUT_MS, gt=0)
    maintenance_chance: int = Field(default=DEFAULT_MAINTENANCE_CHANCE, ge=0, le=1_000_000)
    worker_idle_timeout_ms: int = Field(default=1_000, gt=0)
    lease_ms: int = Field(default=DEFAULT_LEASE_MS, gt=0)
    worker_heartbeat_s: float = Field(default=DEFAULT_WORKER_HEARTBEAT_S, gt=0)
    worker_stale_s: float = Field(default=DEFAULT_WORKER_STALE_S, gt=0)
    worker_shutdown_grace_s: float = Field(default=600.0, ge=0)
    worker_heartbeat_file: Path | None = None
    reconcile_interval_s: float = Field(default=DEFAULT_RECONCILE_INTERVAL_S, ge=0)
    reconcile_after_s: float = Field(default=DEFAULT_RECONCILE_AFTER_S, gt=0)

    namespace: str = "xmag"
    log_level: str = "INFO"
    # Not a field: a field would also be read from an XMAG_ENGINE variable (as JSON).
    _engine: EngineSettings = PrivateAttr()

    def __init__(self, engine: EngineSettings | None = None, **values: Any) -> None:
        super().__init__(**values)
        self._engine = engine if engine is not None else EngineSettings()

    @property
    def engine(self) -> EngineSettings:
        """The engine settings, read once with these (or given to the constructor)."""
        return self._engine

    @field_validator("api_keys", "slide_roots", "callback_allowed_hosts", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @property
    def slide_store(self) -> Path:
        """Folder of uploaded slides, content-addressed by sha256."""
        return self.data_dir / "slides"

    @property
    def results_store(self) -> Path:
        """Folder of results, one sub-folder per content key."""
        return self.data_dir / "results"

    @property
    def redis_dir(self) -> Path:
        """Folder of the embedded Redis (AOF, log, socket)."""
        return self.data_dir / "redis"
