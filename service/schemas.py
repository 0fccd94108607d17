"""Request and response models of the REST API (they are the OpenAPI schema)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator, model_validator

from service.store import JobState
from xmag.params import SlideOptions
from xmag.results import SlideResult

__all__ = [
    "AuditEntry",
    "AuditPage",
    "BatchRequest",
    "BatchView",
    "CancelView",
    "JobErrorView",
    "JobList",
    "JobRequest",
    "JobResult",
    "JobView",
    "ModelsView",
    "Problem",
    "Progress",
    "SlideUploaded",
    "WebhookEvent",
]

Priority = Literal["high", "normal", "low"]
#: The client's metadata of a job: at most this many bytes as compact JSON.
MAX_METADATA_BYTES = 4096
MetadataValue = str | int | float | bool | None


def _not_null(value: Any) -> Any:
    if value is None:
        raise ValueError("omit the field instead of sending null")
    return value


class JobRequest(BaseModel):
    """One slide to embed: an uploaded ``slide_id`` or a ``path`` under the allowed roots
    (exactly one of them)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {"required": ["slide_id"], "properties": {"slide_id": {"type": "string"}}},
                {"required": ["path"], "properties": {"path": {"type": "string"}}},
            ]
        },
    )

    slide_id: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of a slide this client uploaded (PUT/POST /v1/slides).",
    )
    path: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="A path (or file:// URI) under the service's slide roots; a folder for a "
        "DICOM set.",
    )
    reference: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="The client's reference (accession or case number). It comes back in every "
        "view of the job, its result and its webhook; list jobs by it with "
        "GET /v1/jobs?reference=.",
    )
    metadata: dict[str, MetadataValue] | None = Field(
        default=None,
        max_length=32,
        description=f"Free client metadata (at most 32 keys, {MAX_METADATA_BYTES} bytes as "
        "JSON), returned like `reference`.",
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
    options: SlideOptions = Field(default_factory=SlideOptions)

    @field_validator("priority", "options", mode="before")
    @classmethod
    def _present(cls, value: Any) -> Any:
        return _not_null(value)

    @field_validator("metadata")
    @classmethod
    def _small(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            size = len(json.dumps(value, separators=(",", ":")).encode())
            if size > MAX_METADATA_BYTES:
                raise ValueError(
                    f"metadata is {size} bytes as JSON; the limit is {MAX_METADATA_BYTES}"
                )
        return value

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
    """An uploaded slide as this client reaches it."""

    slide_id: str = Field(description="sha256 of the bytes; use it as JobRequest.slide_id.")
    sha256: str
    size_bytes: int
    filename: str | None = Field(
        default=None, description="The file name as uploaded (its last path component)."
    )
    deduplicated: bool = Field(description="True when this client had uploaded these bytes.")


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
    client: str = Field(description="The client (tenant) that owns the job.")
    reference: str | None = None
    metadata: dict[str, Any] | None = None
    batch_id: str | None = None
    slide_id: str | None = None
    slide_sha256: str | None = Field(
        default=None, description="sha256 of the slide's bytes (uploads: known at submission)."
    )
    slide_name: str | None = Field(
        default=None, description="The upload's file name, or the path as given."
    )
    tasks: list[str] | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    progress: Progress
    attempts: int
    cache_hit: bool = Field(
        default=False,
        description="succeeded from the result store: the same slide bytes, model and options "
        "were computed before, so this job neither opened nor read its slide",
    )
    created_at: datetime
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: JobErrorView | None = None
    links: dict[str, str] = Field(default_factory=dict)


class CancelView(JobView):
    cancel: Literal["canceled", "requested", "already_canceled"] = Field(
        description="canceled: it took effect now (the job was queued); requested: the running "
        "job stops between tile batches (poll it); already_canceled: nothing changed"
    )
    took_effect: bool = Field(description="True when this call changed the job.")


class JobList(BaseModel):
    items: list[JobView]
    next_page_token: str | None = Field(
        default=None, description="Pass as page_token for the next page; null on the last."
    )


class BatchView(BaseModel):
    id: str
    client: str
    created_at: datetime
    size: int
    state: Literal["queued", "running", "completed"] = Field(
        description="completed when every job is in a final state"
    )
    counts: dict[str, int]
    jobs: list[JobView] = Field(description="One page of the batch's jobs, in submission order.")
    next_page_token: str | None = Field(
        default=None, description="Pass as page_token for the next page of jobs."
    )


class ModelsView(BaseModel):
    models: list[dict[str, Any]]


class JobContext(BaseModel):
    """The job a result is served for: the client's own reference and metadata."""

    job_id: str
    client: str
    reference: str | None = None
    metadata: dict[str, Any] | None = None


class JobResult(SlideResult):
    """result.json of a succeeded job, with the job's context (``slide.name`` and
    ``slide.path`` name the slide as the client gave it: the upload's file name or its path)."""

    job: JobContext


class Problem(BaseModel):
    """An RFC 9457 problem (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    code: str = Field(description="Stable error code (see service.problems.STATUS_BY_CODE).")
    detail: str
    instance: str | None = None
    fields: dict[str, Any] | None = None
    errors: list[dict[str, Any]] | None = None


class WebhookEventData(BaseModel):
    job_id: str
    state: JobState
    batch_id: str | None = None
    result_url: str | None = Field(default=None, description="Set when the job succeeded.")
    job_url: str | None = None
    error_code: str | None = Field(default=None, description="Why it did not succeed.")
    client: str | None = None
    reference: str | None = Field(default=None, description="The job's client reference.")
    metadata: dict[str, Any] | None = None


class WebhookEvent(BaseModel):
    """A webhook body (Standard Webhooks; signed with the client's own secret)."""

    type: str = Field(description="job.succeeded, job.failed, job.canceled or job.dead")
    timestamp: str
    data: WebhookEventData


class AuditEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(description="Stream id; pass the last one as page_token.")
    time: str
    ms: int
    action: str
    outcome: str
    status: int | None = None
    client: str | None = None
    key_id: str | None = None
    source: str | None = None
    job_id: str | None = None
    batch_id: str | None = None
    slide_sha256: str | None = None
    detail: str | None = None


class AuditPage(BaseModel):
    items: list[AuditEntry]
    next_page_token: str | None = None


def ms_to_datetime(value_ms: int | str | None) -> datetime | None:
    """A Unix time in milliseconds as an aware UTC datetime (None for unset: 0, "" or None)."""
    if not value_ms or value_ms == "0":
        return None
    return datetime.fromtimestamp(int(value_ms) / 1000, tz=UTC)
