"""One exception tree for everything xmag raises on purpose.

    XmagError                          every error has a stable ``code`` and fields
    ├── SlideError                     the input slide is the problem
    │   ├── SlideNotFoundError         SLIDE_NOT_FOUND
    │   ├── UnsupportedFormatError     UNSUPPORTED_FORMAT
    │   ├── CorruptSlideError          CORRUPT_SLIDE
    │   ├── RegionReadError            REGION_READ_FAILED (a tile inside the slide is broken)
    │   │   └── ReadBudgetError        READ_BUDGET_EXCEEDED (a stage read for longer than allowed)
    │   ├── SlideTooLargeError         SLIDE_TOO_LARGE (declares more pixels than xmag will read)
    │   ├── UnknownMppError            UNKNOWN_MPP
    │   ├── InvalidMppError            INVALID_MPP (an override that is not a positive number)
    │   └── NoTissueError              NO_TISSUE
    ├── ModelPackageError              MODEL_PACKAGE_INVALID
    │   └── ChecksumMismatchError      MODEL_CHECKSUM_MISMATCH
    ├── InferenceError                 INFERENCE_FAILED (the runtime failed on good input)
    ├── SettingsError                  INVALID_SETTINGS (unknown XMAG_ variables, strict mode)
    │   └── GpuUnavailableError        (shares INVALID_SETTINGS) a GPU was required, none ran
    └── JobError                       job-level failures raised by the service
        ├── JobCanceledError           JOB_CANCELED
        └── JobNotFoundError           JOB_NOT_FOUND
    XmagUsageError(RuntimeError)       misuse of the API (e.g. a closed reader), a bug in the caller

Codes are part of the public interface: the CLI prints them, the service maps them to HTTP
statuses in one table (``service.problems``), and tests assert them. Never change a code's meaning.

A class registers its code by declaring ``code`` in its own body (``__init_subclass__``); a code
already taken is refused when the class is created. A subclass that declares no ``code`` refines
its parent's error and shares its code without being registered (``all_error_codes`` maps each
code to the class that declared it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "ChecksumMismatchError",
    "CorruptSlideError",
    "GpuUnavailableError",
    "InferenceError",
    "InvalidMppError",
    "JobCanceledError",
    "JobError",
    "JobNotFoundError",
    "ModelPackageError",
    "NoTissueError",
    "ReadBudgetError",
    "RegionReadError",
    "SettingsError",
    "SlideError",
    "SlideNotFoundError",
    "SlideTooLargeError",
    "UnknownMppError",
    "UnsupportedFormatError",
    "XmagError",
    "XmagUsageError",
    "all_error_codes",
]

#: Error classes by code, filled by ``XmagError.__init_subclass__`` (the root registers below).
_CODES: dict[str, type[XmagError]] = {}


class XmagUsageError(RuntimeError):
    """The API was misused (a closed reader, a consumed iterator): a bug in the calling code."""


class XmagError(Exception):
    """Root of every error xmag raises on purpose.

    Attributes:
        code: stable machine-readable code (``UNSUPPORTED_FORMAT``...).
        message: one sentence a person can act on.
        fields: structured context (path, level, mpp source...), JSON-serialisable.
        transient: True when retrying the same input may succeed (I/O hiccups, not bad input).
    """

    code: ClassVar[str] = "XMAG_ERROR"
    transient: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:  # declared here, not inherited: a new code to register
            _register_code(cls)

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            **({"fields": self.fields} if self.fields else {}),
        }

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps fields when errors cross process boundaries (pickling by worker pools).
        return (_rebuild_error, (type(self), self.message, self.fields))


def _register_code(cls: type[XmagError]) -> None:
    """Record ``cls.code``; a code another class already declared is refused."""
    taken = _CODES.get(cls.code)
    if taken is not None and taken is not cls:
        raise XmagUsageError(
            f"error code {cls.code!r} of {cls.__module__}.{cls.__qualname__} is already "
            f"declared by {taken.__module__}.{taken.__qualname__}; choose another code, or "
            "declare no code to share the parent's"
        )
    _CODES[cls.code] = cls


def _rebuild_error(cls: type[XmagError], message: str, fields: dict[str, Any]) -> XmagError:
    return cls(message, **fields)


class SlideError(XmagError):
    """The slide given as input cannot be used; retrying will not help."""

    code = "SLIDE_ERROR"


class SlideNotFoundError(SlideError):
    code = "SLIDE_NOT_FOUND"


class UnsupportedFormatError(SlideError):
    code = "UNSUPPORTED_FORMAT"


class CorruptSlideError(SlideError):
    code = "CORRUPT_SLIDE"


class RegionReadError(SlideError):
    """A region (tile) inside an otherwise readable slide could not be decoded."""

    code = "REGION_READ_FAILED"

    @classmethod
    def for_region(
        cls,
        path: str | Path,
        level: int,
        level0_xy: Sequence[int],
        size: Sequence[int],
        detail: str,
    ) -> RegionReadError:
        """The error for one failed read: message ``"<path>: <detail>"``, fields that locate it.

        Args:
            path: the slide file.
            level: the pyramid level read.
            level0_xy: the region's top-left corner in the level-0 frame (px).
            size: ``(width, height)`` of the region at ``level`` (px).
            detail: what failed, with the value and the fix.
        """
        return cls(
            f"{path}: {detail}",
            path=path,
            level=level,
            level0_xy=list(level0_xy),
            size=list(size),
        )


class ReadBudgetError(RegionReadError):
    """A stage (thumbnail, tissue, tile reads) ran past its time budget reading the slide: the
    slide decodes far slower than its size promises (a hostile or damaged file)."""

    code = "READ_BUDGET_EXCEEDED"


class SlideTooLargeError(SlideError):
    """The slide declares more pixels than a stage may read (no small pyramid level, absurd
    dimensions, huge internal tiles): refused before reading, whatever the file's real size."""

    code = "SLIDE_TOO_LARGE"


class UnknownMppError(SlideError):
    code = "UNKNOWN_MPP"


class InvalidMppError(SlideError):
    code = "INVALID_MPP"


class NoTissueError(SlideError):
    code = "NO_TISSUE"


class ModelPackageError(XmagError):
    code = "MODEL_PACKAGE_INVALID"


class ChecksumMismatchError(ModelPackageError):
    code = "MODEL_CHECKSUM_MISMATCH"


class InferenceError(XmagError):
    code = "INFERENCE_FAILED"
    transient = True


class SettingsError(XmagError):
    """The environment configures xmag wrongly (an unknown ``XMAG_`` variable, strict mode)."""

    code = "INVALID_SETTINGS"


class GpuUnavailableError(SettingsError):
    """The settings require a GPU (``XMAG_REQUIRE_GPU``, or GPU providers without ``cpu``) but
    the encoder would run, or ended up running, on the CPU: no GPU build of onnxruntime, missing
    CUDA/cuDNN/TensorRT libraries, or no device visible. Raised when the engine is built, so a
    worker never serves from the CPU by accident."""


class JobError(XmagError):
    code = "JOB_ERROR"


class JobCanceledError(JobError):
    code = "JOB_CANCELED"


class JobNotFoundError(JobError):
    code = "JOB_NOT_FOUND"


_register_code(XmagError)


def all_error_codes() -> dict[str, type[XmagError]]:
    """Every registered code with the class that declared it (the service's status table uses it).

    Holds the codes of the modules imported so far: the core's, plus the service's once
    ``service.errors`` and ``service.webhooks`` are imported.
    """
    return dict(_CODES)
