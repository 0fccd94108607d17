"""Errors raised by ``training``: a branch of the core's tree, each with its own stable code.

    XmagError (xmag)
    └── TrainingError                  TRAINING_ERROR
        ├── RunStateError              RUN_STATE (the run folder and the flags disagree)
        │   ├── CheckpointExistsError  CHECKPOINT_EXISTS (would overwrite: --resume or --overwrite)
        │   ├── CheckpointMissingError CHECKPOINT_MISSING (--resume with nothing to resume)
        │   └── RunFinishedError       RUN_FINISHED (the schedule ended: --extend-to N)
        ├── ResumeMismatchError        RESUME_MISMATCH (the config differs from the checkpoint's)
        ├── CohortTooSmallError        COHORT_TOO_SMALL (a class has fewer slides than folds)
        ├── LabelsError                LABELS_INVALID (labels CSV unreadable or ids not found)
        └── SlidesFailedError          SLIDES_FAILED (--on-error stop, or every slide unusable)

Codes are declared in each class body, as in ``xmag.errors``, and registered in this module's own
table (``training_error_codes``), which refuses a code taken by another training error or by the
core's tree. They are kept out of the core's table (``xmag.errors.all_error_codes``) on purpose:
that table is what the service maps to HTTP statuses, and training errors never reach the service
(it does not import ``training``). ``python -m training`` prints ``[CODE] message`` and exits with
``EXIT_CODES[code]`` (2 for any code not listed, e.g. the core's slide errors).
"""

from __future__ import annotations

from typing import Any

from xmag.errors import XmagError, XmagUsageError, all_error_codes

__all__ = [
    "EXIT_CODES",
    "CheckpointExistsError",
    "CheckpointMissingError",
    "CohortTooSmallError",
    "LabelsError",
    "ResumeMismatchError",
    "RunFinishedError",
    "RunStateError",
    "SlidesFailedError",
    "TrainingError",
    "exit_code_for",
    "training_error_codes",
]

_TRAINING_CODES: dict[str, type[XmagError]] = {}


def _register_training_code(cls: type[XmagError]) -> None:
    taken = _TRAINING_CODES.get(cls.code) or all_error_codes().get(cls.code)
    if taken is not None and taken is not cls:
        raise XmagUsageError(
            f"error code {cls.code!r} of {cls.__qualname__} is already declared by "
            f"{taken.__module__}.{taken.__qualname__}; choose another code"
        )
    _TRAINING_CODES[cls.code] = cls


class TrainingError(XmagError):
    """A training command cannot go on with the inputs and flags it was given."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Skip XmagError's hook (the core/service table); register here instead.
        super(XmagError, cls).__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            _register_training_code(cls)


TrainingError.code = "TRAINING_ERROR"  # set after the class: not in the core table
_register_training_code(TrainingError)


class RunStateError(TrainingError):
    """The run folder's state (a checkpoint or none) contradicts the flags."""

    code = "RUN_STATE"


class CheckpointExistsError(RunStateError):
    """A checkpoint exists and neither ``--resume`` nor ``--overwrite`` was given."""

    code = "CHECKPOINT_EXISTS"


class CheckpointMissingError(RunStateError):
    """``--resume`` was given but the run folder holds no checkpoint."""

    code = "CHECKPOINT_MISSING"


class RunFinishedError(RunStateError):
    """The checkpoint already reached the end of its schedule; extending it is explicit."""

    code = "RUN_FINISHED"


class ResumeMismatchError(TrainingError):
    """The config given to resume differs from the checkpoint's in a field that matters."""

    code = "RESUME_MISMATCH"


class CohortTooSmallError(TrainingError):
    """A class has fewer slides than cross-validation folds."""

    code = "COHORT_TOO_SMALL"


class LabelsError(TrainingError):
    """A labels CSV is unreadable, or names slides that have no features or slide file."""

    code = "LABELS_INVALID"


class SlidesFailedError(TrainingError):
    """A slide could not be used and ``--on-error stop`` was chosen, or no slide was usable."""

    code = "SLIDES_FAILED"


#: Process exit status per code (``python -m training``); other codes exit 2.
EXIT_CODES: dict[str, int] = {
    "TRAINING_ERROR": 8,
    "RUN_STATE": 3,
    "CHECKPOINT_EXISTS": 3,
    "CHECKPOINT_MISSING": 3,
    "RUN_FINISHED": 3,
    "RESUME_MISMATCH": 4,
    "COHORT_TOO_SMALL": 5,
    "LABELS_INVALID": 6,
    "SLIDES_FAILED": 7,
}


def training_error_codes() -> dict[str, type[XmagError]]:
    """Every training code with the class that declared it."""
    return dict(_TRAINING_CODES)


def exit_code_for(exc: XmagError) -> int:
    """The exit status ``python -m training`` uses for ``exc``."""
    return EXIT_CODES.get(exc.code, 2)
