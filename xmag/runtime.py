"""ONNX Runtime sessions: provider choice, thread counts, IO binding, errors translated.

Providers are tried in the settings' order among those ``onnxruntime.get_available_providers()``
offers: TensorRT (fp16, engine and timing caches on disk, an explicit min/opt/max batch profile
from the card so batch sizes inside it never rebuild the engine), then CUDA, then CPU. The
provider a session actually runs on (ORT silently drops one that fails to initialise) is read
back from the session and recorded in every result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xmag.errors import InferenceError, ModelPackageError
from xmag.settings import PROVIDER_NAMES, EngineSettings

__all__ = ["ModelSession", "choose_providers", "short_provider_name"]

_SHORT = {v: k for k, v in PROVIDER_NAMES.items()}


def short_provider_name(ort_name: str) -> str:
    """ "CUDAExecutionProvider" -> "cuda" (unknown names are returned as they are)."""
    return _SHORT.get(ort_name, ort_name)


def choose_providers(
    settings: EngineSettings,
    available: Sequence[str],
    *,
    trt_profile: Mapping[str, tuple[int, ...]] | None = None,
    allow_tensorrt: bool = True,
) -> list[tuple[str, dict[str, Any]]]:
    """Providers with their options, in preference order, limited to ``available``.

    Args:
        settings: preference order, device id, TensorRT options.
        available: what ``onnxruntime.get_available_providers()`` returned.
        trt_profile: input name -> (min, opt, max) batch sizes, with the rest of each input's
            shape in ``trt_shapes``; only used for TensorRT.
        allow_tensorrt: False for graphs TensorRT has no profile for (heads with a bag axis).

    CPU is always appended last when available, so a GPU failure degrades instead of failing.
    """
    out: list[tuple[str, dict[str, Any]]] = []
    wanted = [PROVIDER_NAMES[p] for p in settings.providers]
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")
    for name in wanted:
        if name not in available:
            continue
        if name == "TensorrtExecutionProvider":
            if not allow_tensorrt:
                continue
            out.append((name, _trt_options(settings, trt_profile or {})))
        elif name == "CUDAExecutionProvider":
            out.append((name, {"device_id": settings.cuda_device_id}))
        else:
            out.append((name, {}))
    return out


def _trt_options(
    settings: EngineSettings, profile: Mapping[str, tuple[int, ...]]
) -> dict[str, Any]:
    cache = Path(settings.trt_cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    opts: dict[str, Any] = {
        "device_id": settings.cuda_device_id,
        "trt_fp16_enable": settings.trt_fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
    }
    if profile:
        # profile values: (min_b, opt_b, max_b, *rest_of_shape)
        def shapes(i: int) -> str:
            return ",".join(
                f"{name}:{'x'.join(str(d) for d in (dims[i], *dims[3:]))}"
                for name, dims in profile.items()
            )

        opts["trt_profile_min_shapes"] = shapes(0)
        opts["trt_profile_opt_shapes"] = shapes(1)
        opts["trt_profile_max_shapes"] = shapes(2)
    return opts


class ModelSession:
    """One ONNX graph loaded in ONNX Runtime; ``run`` maps input arrays to output arrays.

    Attributes:
        path: the ONNX file.
        provider: short name of the provider that actually runs the graph ("cpu", "cuda"...).
        providers: every provider the session holds, in order.
    """

    def __init__(
        self,
        path: Path,
        settings: EngineSettings,
        *,
        trt_profile: Mapping[str, tuple[int, ...]] | None = None,
        allow_tensorrt: bool = True,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = settings.intra_op_threads
        opts.inter_op_num_threads = settings.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Our threads do the waiting; spinning ORT threads would steal the readers' cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        chosen = choose_providers(
            settings,
            ort.get_available_providers(),
            trt_profile=trt_profile,
            allow_tensorrt=allow_tensorrt,
        )
        try:
            self._session = ort.InferenceSession(
                str(self.path),
                sess_options=opts,
                providers=[name for name, _ in chosen],
                provider_options=[o for _, o in chosen],
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/RuntimeException types
            raise ModelPackageError(
                f"ONNX Runtime could not load {self.path} with providers "
                f"{[n for n, _ in chosen]} ({type(exc).__name__}: {exc}); check the onnxruntime "
                "build (onnxruntime-gpu for CUDA/TensorRT) or re-export the model.",
                path=self.path,
            ) from exc
        self.providers = [short_provider_name(p) for p in self._session.get_providers()]
        self.provider = self.providers[0]
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        self._device_id = settings.cuda_device_id

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the graph; returns the requested outputs (all by default) as host arrays.

        Raises:
            InferenceError: ONNX Runtime failed on the inputs (out of memory, a kernel error).
        """
        names = list(outputs) if outputs is not None else self.output_names
        try:
            if self.provider in ("cuda", "tensorrt"):
                values = self._run_bound(inputs, names)
            else:
                values = self._session.run(names, dict(inputs))
        except Exception as exc:  # ORT's exceptions are not part of a stable hierarchy
            shapes = {k: tuple(v.shape) for k, v in inputs.items()}
            raise InferenceError(
                f"ONNX Runtime failed running {self.path.name} on {self.provider} with inputs "
                f"{shapes} ({type(exc).__name__}: {exc}); lower the batch size "
                "(XMAG_BATCH_SIZE) if the device ran out of memory, else report it.",
                path=self.path,
                provider=self.provider,
            ) from exc
        return dict(zip(names, values, strict=True))

    def _run_bound(self, inputs: Mapping[str, np.ndarray], names: Sequence[str]) -> list[Any]:
        """IO binding: inputs copied to the device once, outputs allocated by ORT on the device
        and copied back once, instead of ORT staging every call through pageable host buffers."""
        import onnxruntime as ort

        binding = self._session.io_binding()
        for name, arr in inputs.items():
            dev = ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(arr), "cuda", self._device_id
            )
            binding.bind_ortvalue_input(name, dev)
        for name in names:
            binding.bind_output(name, "cuda", self._device_id)
        self._session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())
