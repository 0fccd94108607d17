"""The settings root: unknown XMAG_ variables reported, one engine settings object per service,
card runtime hints as defaults that explicit settings override."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

import pytest

from service.settings import ServiceSettings
from xmag.errors import SettingsError
from xmag.package import BatchProfile, ModelCard, RuntimeHints, Variant
from xmag.runtime import apply_card_hints, choose_providers
from xmag.settings import (
    STRICT_SETTINGS_ENV,
    EngineSettings,
    check_environment,
    known_variables,
)

CPU = ["CPUExecutionProvider"]
GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


# -- unknown variables -----------------------------------------------------------------------------
def test_a_misspelt_variable_is_reported_with_the_closest_known_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="xmag.settings"):
        messages = check_environment({"XMAG_BATCH_SIZ": "8", "XMAG_BATCH_SIZE": "8", "HOME": "/"})
    assert len(messages) == 1
    assert "XMAG_BATCH_SIZ " in messages[0] and "did you mean XMAG_BATCH_SIZE?" in messages[0]
    assert [r.getMessage() for r in caplog.records] == messages


def test_strict_mode_makes_an_unknown_variable_a_typed_error() -> None:
    env = {"XMAG_PROVIDRES": "cpu", STRICT_SETTINGS_ENV: "1"}
    with pytest.raises(SettingsError) as info:
        check_environment(env)
    assert info.value.code == "INVALID_SETTINGS"
    assert info.value.fields == {"variables": ["XMAG_PROVIDRES"]}
    assert "did you mean XMAG_PROVIDERS?" in info.value.message


def test_strict_mode_accepts_an_environment_of_known_variables() -> None:
    env = {"XMAG_BATCH_SIZE": "8", "XMAG_API_KEYS": "k", "XMAG_REDIS_URL": "redis://r", "X": "1"}
    assert check_environment({**env, STRICT_SETTINGS_ENV: "1"}) == []


def test_the_environment_checked_by_default_is_the_process_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XMAG_QUEUE_DEPHT", "2")
    reported: list[str] = []
    check_environment(warn=reported.append)
    assert any("XMAG_QUEUE_DEPHT" in m and "XMAG_QUEUE_DEPTH" in m for m in reported)


def test_every_field_of_both_settings_classes_is_a_known_variable() -> None:
    known = known_variables()
    for cls in (EngineSettings, ServiceSettings):
        for name, info in cls.model_fields.items():
            if info.validation_alias is None:
                assert f"XMAG_{name.upper()}" in known, (cls.__name__, name)
    assert "XMAG_REDIS_URL" in known  # an alias of redis_url (REDIS_URL has no prefix)
    assert "XMAG_ENGINE" not in known  # the service's engine settings are not read as JSON


@pytest.mark.parametrize(
    ("env", "exit_code", "said"),
    [
        ({"XMAG_BATCH_SIZ": "8"}, 0, "warning: XMAG_BATCH_SIZ is not a setting"),
        ({"XMAG_BATCH_SIZ": "8", STRICT_SETTINGS_ENV: "1"}, 2, "INVALID_SETTINGS"),
    ],
)
def test_the_cli_reports_unknown_variables_at_startup(
    env: dict[str, str], exit_code: int, said: str
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("XMAG_")}
    proc = subprocess.run(
        [sys.executable, "-c", "from xmag.cli import main; main()", "--help"],
        env={**clean, **env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == exit_code, proc.stderr
    assert said in proc.stderr
    assert "did you mean XMAG_BATCH_SIZE?" in proc.stderr
    # The service's variables are known to the core CLI through its plugin.
    assert "XMAG_API_KEYS" not in proc.stderr


# -- one engine settings object in the service -----------------------------------------------------
def test_the_service_settings_build_the_engine_settings_once_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XMAG_BATCH_SIZE", "6")
    monkeypatch.setenv("XMAG_ENGINE", '{"batch_size": 7}')  # not a setting: never read
    settings = ServiceSettings()
    assert settings.engine.batch_size == 6
    assert settings.engine is settings.engine
    assert settings.model_copy().engine.batch_size == 6


def test_engine_settings_given_to_the_service_settings_are_kept() -> None:
    engine = EngineSettings(providers=["cpu"], batch_size=3)
    assert ServiceSettings(engine=engine, namespace="t").engine is engine


# -- card hints ------------------------------------------------------------------------------------
def _card(**runtime: Any) -> ModelCard:
    files = ["model.onnx", "model.fp16.onnx", "model.int8.onnx"]
    return ModelCard(
        name="m",
        version="1",
        trained=False,
        description="d",
        architecture={"tag": "cnn"},  # type: ignore[arg-type]
        input={"tile_px": 224, "target_mpp": 2.0},  # type: ignore[arg-type]
        outputs={"embedding": {"name": "embedding", "dim": 8}},  # type: ignore[arg-type]
        files=[{"path": p, "sha256": "0" * 64} for p in files],  # type: ignore[misc]
        variants=[
            Variant(name="fp32", file="model.onnx", precision="fp32", providers=GPU),
            Variant(
                name="fp16",
                file="model.fp16.onnx",
                precision="fp16",
                providers=["CUDAExecutionProvider"],
            ),
            Variant(name="int8", file="model.int8.onnx", precision="int8", providers=CPU),
        ],
        runtime=RuntimeHints(**runtime),
    )


@pytest.mark.parametrize(
    ("providers", "available", "variant"),
    [
        (["tensorrt", "cuda", "cpu"], GPU, "fp32"),  # TensorRT builds its own fp16 engine
        (["cuda", "cpu"], GPU, "fp16"),
        (["tensorrt", "cuda", "cpu"], CPU, "int8"),  # no GPU offered: the CPU variant
    ],
)
def test_the_card_s_variant_for_the_provider_is_used_when_none_is_set(
    providers: list[str], available: list[str], variant: str
) -> None:
    settings = EngineSettings(providers=providers)  # type: ignore[arg-type]
    assert apply_card_hints(settings, _card(), available).variant == variant


def test_a_variant_set_explicitly_overrides_the_card(monkeypatch: pytest.MonkeyPatch) -> None:
    assert apply_card_hints(EngineSettings(variant="fp32"), _card(), CPU).variant == "fp32"
    monkeypatch.setenv("XMAG_VARIANT", "fp16")
    assert apply_card_hints(EngineSettings(), _card(), CPU).variant == "fp16"


def test_tensorrt_hints_are_used_when_unset_and_overridden_when_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    card = _card(trt_fp16=False, trt_workspace_mb=2048, batch=BatchProfile(min=2, opt=16, max=48))
    hinted = apply_card_hints(EngineSettings(trt_cache_dir=tmp_path), card, GPU)
    assert (hinted.trt_fp16, hinted.trt_workspace_mb) == (False, 2048)
    assert hinted.trt_batch_profile == (2, 16, 48)
    assert hinted.batch_size == 16
    trt = dict(choose_providers(hinted, GPU))["TensorrtExecutionProvider"]
    assert trt["trt_fp16_enable"] is False
    assert trt["trt_max_workspace_size"] == 2048 * 1024 * 1024

    monkeypatch.setenv("XMAG_TRT_FP16", "true")
    monkeypatch.setenv("XMAG_TRT_WORKSPACE_MB", "512")
    monkeypatch.setenv("XMAG_TRT_BATCH_PROFILE", "1,8,8")
    explicit = apply_card_hints(EngineSettings(batch_size=4, trt_cache_dir=tmp_path), card, GPU)
    assert (explicit.trt_fp16, explicit.trt_workspace_mb) == (True, 512)
    assert explicit.trt_batch_profile == (1, 8, 8)
    assert explicit.batch_size == 4


def test_a_setting_equal_to_its_default_still_counts_as_set() -> None:
    card = _card(trt_fp16=False)
    assert apply_card_hints(EngineSettings(trt_fp16=True), card, GPU).trt_fp16 is True
    assert apply_card_hints(EngineSettings(), card, GPU).trt_fp16 is False


def test_the_caller_s_settings_are_not_modified() -> None:
    settings = EngineSettings()
    apply_card_hints(settings, _card(trt_workspace_mb=64), GPU)
    assert settings.trt_workspace_mb is None and settings.variant is None


def test_a_batch_profile_out_of_order_is_refused() -> None:
    with pytest.raises(ValueError, match="min <= opt <= max"):
        EngineSettings(trt_batch_profile="8,4,16")  # type: ignore[arg-type]
