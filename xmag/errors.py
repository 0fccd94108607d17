"""One exception tree for everything xmag raises on purpose.

    XmagError                          every error has a stable ``code`` and fields
    ├── SlideError                     the input slide is the problem
    │   ├── SlideNotFoundError         SLIDE_NOT_FOUND
    │   ├── UnsupportedFormatError     UNSUPPORTED_FORMAT
    │   ├── CorruptSlideError          CORRUPT_SLIDE
    │   ├── RegionReadError            REGION_READ_FAILED (a tile inside the slide is broken)
    │   ├── UnknownMppError            UNKNOWN_MPP
    │   ├── InvalidMppError            INVALID_MPP (an override that is not a positive number)
    │   └── NoTissueError              NO_TISSUE
    ├── ModelPackageError              MODEL_PACKAGE_INVALID
    │   └── ChecksumMismatchError      MODEL_CHECKSUM_MISMATCH
    ├── InferenceError                 INFERENCE_FAILED (the runtime failed on good input)
    └── JobError                       job-level failures raised by the service
        ├── JobCanceledError           JOB_CANCELED
        └── JobNotFoundError           JOB_NOT_FOUND
    XmagUsageError(RuntimeError)       misuse of the API (e.g. a closed reader), a bug in the caller

Codes are part of the public interface: the CLI prints them, the service maps them to HTTP
statuses in one table (``service.problems``), and tests assert them. Never change a code's meaning.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "SUPPORTED_FORMATS_SENTENCE",
    "ChecksumMismatchError",
    "CorruptSlideError",
    "InferenceError",
    "InvalidMppError",
    "JobCanceledError",
    "JobError",
    "JobNotFoundError",
    "ModelPackageError",
    "NoTissueError",
    "RegionReadError",
    "SlideError",
    "SlideNotFoundError",
    "UnknownMppError",
    "UnsupportedFormatError",
    "XmagError",
    "XmagUsageError",
    "all_error_codes",
]

SUPPORTED_FORMATS_SENTENCE = (
    "Supported formats: Aperio SVS, Hamamatsu NDPI, 3DHISTECH MRXS, Philips TIFF, Leica SCN, "
    "Ventana BIF, generic tiled TIFF, OME-TIFF, other TIFFs readable by tifffile, and DICOM WSI "
    "(a .dcm file or a folder of instances)."
)


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


class JobError(XmagError):
    code = "JOB_ERROR"


class JobCanceledError(JobError):
    code = "JOB_CANCELED"


class JobNotFoundError(JobError):
    code = "JOB_NOT_FOUND"


class XmagUsageError(RuntimeError):
    """The API was misused (a closed reader, a consumed iterator): a bug in the calling code."""


def all_error_codes() -> dict[str, type[XmagError]]:
    """Every error class by code, walked from the tree (the service's status table uses it)."""
    out: dict[str, type[XmagError]] = {}
    stack: list[type[XmagError]] = [XmagError]
    while stack:
        cls = stack.pop()
        out[cls.code] = cls
        stack.extend(cls.__subclasses__())
    return out
