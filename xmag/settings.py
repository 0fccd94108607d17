"""Engine settings from ``XMAG_*`` environment variables (pydantic-settings).

    XMAG_PROVIDERS            preference order, e.g. '["tensorrt","cuda","cpu"]' or "cuda,cpu"
    XMAG_INTRA_OP_THREADS     ORT threads per operator (default: the CPUs this process may use)
    XMAG_BATCH_SIZE           tiles per model call
    XMAG_READER_WORKERS       threads decoding tiles
    XMAG_QUEUE_DEPTH          batches read ahead of the model (bounds memory)
    XMAG_READER_NICE          niceness added to the threads that read, decode and plan (Linux;
                              0: same priority as the model), so the model wins the cores
    XMAG_TRT_FP16, XMAG_TRT_WORKSPACE_MB, XMAG_TRT_BATCH_PROFILE ("min,opt,max")
    XMAG_TRT_CACHE_DIR, XMAG_CUDA_DEVICE_ID, XMAG_VARIANT, XMAG_CACHE_DIR
    XMAG_REQUIRE_GPU          1: the encoder must run on TensorRT or CUDA, else the engine refuses
                              to build (also implied by a GPU-first list without "cpu")
    XMAG_GPU_DEVICES          GPUs for `xmag serve --workers N`, e.g. "0,1,2,3": worker i gets
                              CUDA_VISIBLE_DEVICES=devices[i % len(devices)]
    XMAG_DEVICE_NORMALIZE     feed uint8 tiles and normalise inside the graph (default: on GPUs)
    XMAG_PAD_BATCHES          pad a short last batch to the batch size (default: on GPUs)

Variant, TensorRT fp16, workspace, batch profile and batch size default to the model card's
runtime hints (``xmag.runtime.apply_card_hints``): a variable set here overrides the card, an unset
one lets the card decide (``model_fields_set`` tells them apart).

The settings root: every settings class reading ``XMAG_*`` variables registers with
``@register_settings`` (this module's ``EngineSettings``; the service adds its own), and
``check_environment`` reports, at the start of a command, each ``XMAG_*`` variable none of them
reads, with the closest known name. Several classes share the prefix, so none can forbid unknown
variables itself. ``XMAG_STRICT_SETTINGS=1`` turns the report into a ``SettingsError``.

Nothing is read at import time: the CPU count is computed when a settings object is built.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from xmag.errors import SettingsError

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_GPU_BATCH_PROFILE",
    "DEFAULT_QUEUE_DEPTH",
    "DEFAULT_READER_NICE",
    "ENV_PREFIX",
    "GPU_PROVIDERS",
    "PROVIDER_NAMES",
    "STRICT_SETTINGS_ENV",
    "EngineSettings",
    "available_cpus",
    "check_environment",
    "known_variables",
    "register_settings",
]

ENV_PREFIX = "XMAG_"
#: Set to 1 (true, yes, on) to make an unknown ``XMAG_*`` variable an error at startup.
STRICT_SETTINGS_ENV = "XMAG_STRICT_SETTINGS"
#: ``XMAG_*`` variables read outside any settings class, with their reader.
_OTHER_VARIABLES = {
    STRICT_SETTINGS_ENV: "xmag.settings.check_environment",
    "XMAG_REQUIRE_TRAIN": "the test suite (CI: torch tests may not be skipped)",
}
_TRUE = frozenset({"1", "true", "yes", "on"})
_SettingsT = TypeVar("_SettingsT", bound=type[BaseSettings])
_SETTINGS_CLASSES: dict[str, type[BaseSettings]] = {}
_log = logging.getLogger("xmag.settings")

ProviderName = Literal["tensorrt", "cuda", "cpu"]
DEFAULT_PROVIDERS: tuple[ProviderName, ...] = ("tensorrt", "cuda", "cpu")
#: Our short provider names -> ONNX Runtime execution provider names.
PROVIDER_NAMES: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
DEFAULT_BATCH_SIZE = 32  # tiles per model call; 32 x 224 x 224 x 3 float32 = 19 MiB
#: (min, opt, max) tiles per call on TensorRT/CUDA when the card keeps the schema's CPU-sized
#: default profile: 256 x 224 x 224 x 3 uint8 = 37 MiB per upload, a ViT-B/14 fp16 batch of 256
#: needs about 3 GiB of activations, well inside a data-centre GPU.
DEFAULT_GPU_BATCH_PROFILE: tuple[int, int, int] = (1, 256, 512)
#: Our short names of the providers that run on a GPU.
GPU_PROVIDERS: frozenset[str] = frozenset({"tensorrt", "cuda"})
DEFAULT_QUEUE_DEPTH = 4  # batches read ahead of the model
DEFAULT_READER_WORKERS = 4
#: Niceness added to reader, decoder and planner threads (Linux), so that when they and the
#: model are both runnable the model gets the cores. Measured on 2 shared cores: one slide at a
#: time, 10 and 0 were alike within the noise (benchmarks/bench_engine.py --nice 0 10); with
#: two slides in flight, the model's seconds per slide grew about 10% with 10 and about 45%
#: with 0 (benchmarks/bench_inflight.py --reader-nice).
DEFAULT_READER_NICE = 10
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2 quota ("max 100000" = no quota)
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by the cgroup quota (v2 cpu.max, else v1 cfs), or None without a quota."""
    try:
        if _CGROUP_CPU_MAX.is_file():
            quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if _CGROUP_V1_QUOTA.is_file() and _CGROUP_V1_PERIOD.is_file():
            quota_us = int(_CGROUP_V1_QUOTA.read_text())
            period_us = int(_CGROUP_V1_PERIOD.read_text())
            return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None  # unreadable or odd cgroup files: fall back to the affinity count
    return None


def available_cpus() -> int:
    """CPUs this process may actually use: its affinity mask, capped by a cgroup CPU quota.

    ``os.cpu_count()`` counts the host's cores, which inside a container with a quota of 2 CPUs
    on a 64-core host would start 64 threads fighting for 2.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def register_settings(cls: _SettingsT) -> _SettingsT:
    """Class decorator: ``check_environment`` knows the ``XMAG_*`` variables ``cls`` reads."""
    _SETTINGS_CLASSES[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def _variables_of(cls: type[BaseSettings]) -> set[str]:
    """Environment names ``cls`` reads, upper case: prefix + field name, or the field's aliases."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    out: set[str] = set()
    for name, info in cls.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            out.update(c.upper() for c in alias.choices if isinstance(c, str))
        elif isinstance(alias, str):
            out.add(alias.upper())
        else:
            out.add(f"{prefix}{name}".upper())
    return out


def known_variables() -> frozenset[str]:
    """Every ``XMAG_*`` variable a registered settings class (or a known reader) reads."""
    names = {n for cls in _SETTINGS_CLASSES.values() for n in _variables_of(cls)}
    return frozenset(n for n in names | set(_OTHER_VARIABLES) if n.startswith(ENV_PREFIX))


def check_environment(
    environ: Mapping[str, str] | None = None, *, warn: Callable[[str], None] | None = None
) -> list[str]:
    """Report the ``XMAG_*`` variables no registered settings class reads (call at startup).

    Args:
        environ: the variables to check (default ``os.environ``).
        warn: where each sentence goes (default: a warning on the ``xmag.settings`` logger).

    Returns:
        One sentence per unknown variable, naming it and the closest known name.

    Raises:
        SettingsError: unknown variables while ``XMAG_STRICT_SETTINGS`` is true.
    """
    env = os.environ if environ is None else environ
    known = known_variables()
    unknown = sorted(k for k in env if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)
    messages = [_unknown_message(name, known) for name in unknown]
    if messages and env.get(STRICT_SETTINGS_ENV, "").strip().lower() in _TRUE:
        raise SettingsError(
            " ".join(messages)
            + f" Fix or unset them, or unset {STRICT_SETTINGS_ENV} to only warn.",
            variables=unknown,
        )
    messages = [f"{m} It is ignored." for m in messages]
    for message in messages:
        (warn or _log.warning)(message)
    return messages


def _unknown_message(name: str, known: frozenset[str]) -> str:
    close = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(known))}"
    return f"{name} is not a setting xmag reads ({hint})."


@register_settings
class EngineSettings(BaseSettings):
    """How the engine runs a model: providers, threads, batches and caches.

    ``variant``, ``trt_fp16``, ``trt_workspace_mb``, ``trt_batch_profile`` and ``batch_size`` are
    overridden by the model card's runtime hints unless set explicitly (by argument or variable).
    """

    model_config = SettingsConfigDict(env_prefix="XMAG_", extra="ignore")

    providers: Annotated[list[ProviderName], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_PROVIDERS),
        description="execution providers to try, in order, among those onnxruntime offers",
    )
    intra_op_threads: int = Field(
        default_factory=available_cpus, ge=1, description="ORT threads within one operator"
    )
    inter_op_threads: int = Field(default=1, ge=1, description="ORT threads across operators")
    batch_size: int = Field(
        default=DEFAULT_BATCH_SIZE, ge=1, le=4096, description="tiles per model call"
    )
    reader_workers: int = Field(
        default_factory=lambda: min(DEFAULT_READER_WORKERS, available_cpus() * 2),
        ge=1,
        description="threads decoding tiles (OpenSlide releases the GIL)",
    )
    queue_depth: int = Field(
        default=DEFAULT_QUEUE_DEPTH,
        ge=1,
        le=64,
        description="preprocessed batches waiting for the model",
    )
    reader_nice: int = Field(
        default=DEFAULT_READER_NICE,
        ge=0,
        le=19,
        description="niceness added to the threads that read, decode, preprocess and plan "
        "(Linux; 0 keeps them at the model's priority)",
    )
    trt_fp16: bool = Field(default=True, description="TensorRT: build fp16 engines")
    trt_workspace_mb: int | None = Field(
        default=None, ge=1, description="TensorRT builder workspace (MiB); None: ORT's default"
    )
    trt_batch_profile: Annotated[tuple[int, int, int] | None, NoDecode] = Field(
        default=None, description="TensorRT (min, opt, max) batch sizes; None: the card's"
    )
    trt_cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "xmag" / "tensorrt",
        description="TensorRT engine and timing cache folder (a volume in containers)",
    )
    cuda_device_id: int = Field(default=0, ge=0)
    variant: str | None = Field(
        default=None, description="encoder variant from the card (fp16, int8...)"
    )
    cache_dir: Path | None = Field(
        default=None, description="content-addressed result cache folder; None disables the cache"
    )
    require_gpu: bool = Field(
        default=False,
        description="the encoder must run on TensorRT or CUDA; the engine refuses to build on CPU",
    )
    gpu_devices: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="GPUs (ids or UUIDs) shared round-robin by the workers `xmag serve` starts",
    )
    device_normalize: bool | None = Field(
        default=None,
        description="feed uint8 NHWC tiles and normalise in the graph; None: on GPU providers",
    )
    pad_batches: bool | None = Field(
        default=None,
        description="pad a short batch to batch_size (no new shapes); None: on GPU providers",
    )

    @property
    def gpu_required(self) -> bool:
        """True when the encoder may not run on the CPU: ``require_gpu``, or a provider list
        that starts with a GPU provider and leaves ``cpu`` out (no CPU fallback allowed)."""
        if self.require_gpu:
            return True
        return bool(self.providers) and (
            self.providers[0] in GPU_PROVIDERS and "cpu" not in self.providers
        )

    @field_validator("gpu_devices", mode="before")
    @classmethod
    def _split_devices(cls, v: object) -> object:
        if isinstance(v, str):
            return [d.strip() for d in v.split(",") if d.strip()]
        return v

    @field_validator("trt_batch_profile", mode="before")
    @classmethod
    def _split_profile(cls, v: object) -> object:
        if isinstance(v, str):
            return tuple(int(p) for p in v.replace("x", ",").split(",") if p.strip())
        return v

    @field_validator("trt_batch_profile")
    @classmethod
    def _ordered_profile(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and not 1 <= v[0] <= v[1] <= v[2]:
            raise ValueError(f"trt_batch_profile needs 1 <= min <= opt <= max, got {v}")
        return v

    @field_validator("providers", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [p.strip().lower() for p in text.split(",") if p.strip()]
        return v
