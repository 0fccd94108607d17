"""Request and response models of the REST API (they are the OpenAPI schema)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, model_validator

from service.store import JobState

__all__ = [
    "BatchRequest",
    "BatchView",
    "JobErrorView",
    "JobList",
    "JobRequest",
    "JobView",
    "ModelsView",
    "Progress",
    "SlideOptionsIn",
    "SlideUploaded",
]

Priority = Literal["high", "normal", "low"]


class SlideOptionsIn(BaseModel):
    """Per-slide options passed to the engine (``xmag.engine.SlideOptions``)."""

    model_config = ConfigDict(extra="forbid")

    mpp_override: float | None = Field(
        default=None, gt=0, le=100, description="Use this um/px instead of the slide's metadata."
    )
    default_mpp: float | None = Field(
        default=None, gt=0, le=100, description="um/px to assume when the slide states none."
    )
    tissue_threshold: float | None = Field(
        default=None, ge=0, le=1, description="Tissue fraction a tile needs to be kept."
    )


class JobRequest(BaseModel):
    """One slide to embed: an uploaded ``slide_id`` or a ``path`` under the allowed roots."""

    model_config = ConfigDict(extra="forbid")

    slide_id: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$", description="sha256 from PUT/POST /v1/slides."
    )
    path: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="A path (or file:// URI) under XMAG_SLIDE_ROOTS; a folder for a DICOM set.",
    )
    tasks: list[str] | None = Field(
        default=None,
        max_length=32,
        description=(
            "Task heads whose predictions the result reports (default: every head). Names come "
            "from GET /v1/models (card.heads[].name); an unknown name is refused (UNKNOWN_TASK). "
            "One encoder pass feeds every head, so features.h5 and tiles.geojson carry the "
            "per-tile scores of every tile head."
        ),
    )
    priority: Priority = "normal"
    callback_url: AnyHttpUrl | None = Field(
        default=None, description="Receives a signed webhook when the job finishes."
    )
    options: SlideOptionsIn = Field(default_factory=SlideOptionsIn)

    @model_validator(mode="after")
    def _one_slide(self) -> JobRequest:
        if (self.slide_id is None) == (self.path is None):
            raise ValueError("give exactly one of slide_id (an upload) or path (a reference)")
        return self


class BatchRequest(BaseModel):
    """Many slides in one call; ``callback_url`` applies to jobs that set none."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[JobRequest] = Field(min_length=1, max_length=10_000)
    callback_url: AnyHttpUrl | None = None


class SlideUploaded(BaseModel):
    slide_id: str = Field(description="sha256 of the bytes; use it as JobRequest.slide_id.")
    sha256: str
    size_bytes: int
    deduplicated: bool = Field(description="True when these bytes were already stored.")


class Progress(BaseModel):
    tiles_done: int
    tiles_total: int


class JobErrorView(BaseModel):
    code: str
    message: str


class JobView(BaseModel):
    id: str
    state: JobState
    priority: Priority
    batch_id: str | None = None
    slide_id: str | None = None
    tasks: list[str] | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    progress: Progress
    attempts: int
    created_at: datetime
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: JobErrorView | None = None
    links: dict[str, str] = Field(default_factory=dict)


class JobList(BaseModel):
    items: list[JobView]
    next_offset: int | None = None


class BatchView(BaseModel):
    id: str
    created_at: datetime
    size: int
    state: Literal["queued", "running", "completed"] = Field(
        description="completed when every job is in a final state"
    )
    counts: dict[str, int]
    jobs: list[JobView]


class ModelsView(BaseModel):
    models: list[dict[str, Any]]


def ms_to_datetime(value: str | None) -> datetime | None:
    if not value or value == "0":
        return None
    return datetime.fromtimestamp(int(value) / 1000, tz=UTC)
