"""Training errors: a code each, an exit status each, kept out of the service's code table."""

from __future__ import annotations

import pytest

from tests.torch_required import require_torch

require_torch()

from training import errors  # noqa: E402
from xmag.errors import XmagUsageError, all_error_codes  # noqa: E402


def test_every_training_code_has_its_own_exit_status_and_is_not_in_the_service_table() -> None:
    codes = errors.training_error_codes()
    assert {"CHECKPOINT_EXISTS", "RESUME_MISMATCH", "COHORT_TOO_SMALL"} <= set(codes)
    for code, cls in codes.items():
        assert cls.code == code and issubclass(cls, errors.TrainingError)
        assert errors.EXIT_CODES[code] > 2, code
        assert code not in all_error_codes(), code  # the service never meets these


def test_a_code_already_declared_by_training_or_the_core_is_refused() -> None:
    for taken in ("COHORT_TOO_SMALL", "NO_TISSUE"):
        with pytest.raises(XmagUsageError, match="already declared"):
            type("Clash", (errors.TrainingError,), {"code": taken})
