"""Errors raised by ``model_export``: a branch of the core's ``ModelPackageError``.

    ModelPackageError (xmag)        MODEL_PACKAGE_INVALID
    └── ExportError                 the export could not produce a valid package
        ├── CheckpointError         the checkpoint file is corrupt, foreign or does not fit
        └── ParityError             a variant's outputs fall short of PyTorch's (see the report)

They keep the core's code (``MODEL_PACKAGE_INVALID``): the service maps every code in one table and
never imports this package, so export errors add no code of their own. ``reason`` tells them apart
for people and tests (``corrupt``, ``missing_keys``, ``shape_mismatch``, ``parity``...).
"""

from __future__ import annotations

from typing import Any, ClassVar

from xmag.errors import ModelPackageError

__all__ = ["CheckpointError", "ExportError", "ParityError"]


class ExportError(ModelPackageError):
    """The export failed; the message names the file and the fix."""

    default_reason: ClassVar[str] = "export_failed"

    def __init__(self, message: str, *, reason: str | None = None, **fields: Any) -> None:
        super().__init__(message, reason=reason or self.default_reason, **fields)

    @property
    def reason(self) -> str:
        """Machine-readable cause within the export (``corrupt``, ``missing_keys``...)."""
        return str(self.fields["reason"])


class CheckpointError(ExportError):
    """A checkpoint cannot be read or does not match the architecture it claims."""

    default_reason = "checkpoint_invalid"


class ParityError(ExportError):
    """An exported variant disagrees with PyTorch beyond its threshold."""

    default_reason = "parity"
