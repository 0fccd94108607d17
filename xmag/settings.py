"""Engine settings from ``XMAG_*`` environment variables (pydantic-settings).

    XMAG_PROVIDERS            preference order, e.g. '["tensorrt","cuda","cpu"]' or "cuda,cpu"
    XMAG_INTRA_OP_THREADS     ORT threads per operator (default: the CPUs this process may use)
    XMAG_BATCH_SIZE           tiles per model call
    XMAG_READER_WORKERS       threads decoding tiles
    XMAG_QUEUE_DEPTH          batches read ahead of the model (bounds memory)
    XMAG_TRT_FP16, XMAG_TRT_CACHE_DIR, XMAG_CUDA_DEVICE_ID, XMAG_VARIANT, XMAG_CACHE_DIR

Nothing is read at import time: the CPU count is computed when a settings object is built.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_QUEUE_DEPTH",
    "PROVIDER_NAMES",
    "EngineSettings",
    "available_cpus",
]

ProviderName = Literal["tensorrt", "cuda", "cpu"]
DEFAULT_PROVIDERS: tuple[ProviderName, ...] = ("tensorrt", "cuda", "cpu")
#: Our short provider names -> ONNX Runtime execution provider names.
PROVIDER_NAMES: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
DEFAULT_BATCH_SIZE = 32  # tiles per model call; 32 x 224 x 224 x 3 float32 = 19 MiB
DEFAULT_QUEUE_DEPTH = 4  # batches read ahead of the model
DEFAULT_READER_WORKERS = 4
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


class EngineSettings(BaseSettings):
    """How the engine runs a model: providers, threads, batches and caches."""

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
    trt_fp16: bool = Field(default=True, description="TensorRT: build fp16 engines")
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
