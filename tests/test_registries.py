"""Registries instead of hand-kept lists: error codes declared once and mapped to one HTTP table."""

from __future__ import annotations

import pytest

import service.errors
import service.webhooks
from service.problems import STATUS_BY_CODE
from xmag.errors import (
    ModelPackageError,
    SlideError,
    UnsupportedFormatError,
    XmagError,
    XmagUsageError,
    all_error_codes,
)

# Codes the framework raises with no XmagError behind them (service.problems._http_code).
HTTP_ONLY_CODES = {"METHOD_NOT_ALLOWED", "UNSUPPORTED_MEDIA_TYPE"}


def test_every_registered_code_maps_to_an_http_status_in_the_one_table() -> None:
    codes = all_error_codes()
    assert "WEBHOOK_DELIVERY_FAILED" in codes and "UPLOAD_TOO_LARGE" in codes  # service branch
    unmapped = sorted(set(codes) - set(STATUS_BY_CODE))
    assert not unmapped, f"add these codes to service.problems.STATUS_BY_CODE: {unmapped}"
    stale = sorted(set(STATUS_BY_CODE) - set(codes) - HTTP_ONLY_CODES)
    assert not stale, f"STATUS_BY_CODE maps codes no error class declares: {stale}"


def test_each_code_belongs_to_the_class_that_declared_it() -> None:
    for code, cls in all_error_codes().items():
        assert cls.code == code
        assert "code" in vars(cls), cls
    assert all_error_codes()["UNSUPPORTED_FORMAT"] is UnsupportedFormatError
    assert issubclass(all_error_codes()["SERVICE_UNAVAILABLE"], service.errors.ServiceError)
    assert all_error_codes()["WEBHOOK_DELIVERY_FAILED"] is service.webhooks.WebhookDeliveryError


def test_a_code_declared_twice_is_refused_when_the_class_is_created() -> None:
    with pytest.raises(XmagUsageError, match=r"'UNSUPPORTED_FORMAT' .* already declared"):

        class Again(SlideError):
            code = "UNSUPPORTED_FORMAT"

    assert all_error_codes()["UNSUPPORTED_FORMAT"] is UnsupportedFormatError


def test_a_subclass_without_a_code_of_its_own_shares_its_parent_s_and_registers_nothing() -> None:
    before = all_error_codes()

    class Refinement(ModelPackageError):
        pass

    assert Refinement.code == "MODEL_PACKAGE_INVALID"
    assert all_error_codes() == before
    assert all_error_codes()["MODEL_PACKAGE_INVALID"] is ModelPackageError


def test_the_registry_is_a_copy_the_caller_cannot_corrupt() -> None:
    codes = all_error_codes()
    codes["NEW"] = XmagError
    assert "NEW" not in all_error_codes()
