"""ONNX Runtime sessions: provider choice, thread counts, IO binding, errors translated.

Providers are tried in the settings' order among those ``onnxruntime.get_available_providers()``
offers: TensorRT (fp16, engine and timing caches on disk, an explicit min/opt/max batch profile
from the card so batch sizes inside it never rebuild the engine), then CUDA, then CPU. The
provider a session actually runs on (ORT silently drops one that fails to initialise) is read
back from the session and recorded in every result.

The model card's runtime hints (the variant meant for each provider, TensorRT fp16, workspace and
batch profile) are defaults: ``apply_card_hints`` fills them into the settings a caller did not
set explicitly, in one place, before sessions are built. The benchmark (``benchmarks/bench_gpu.py``)
builds its sessions through the same two functions, so it measures the engine serving builds.

The GPU path never degrades in silence:

* GPU required (``EngineSettings.gpu_required``: ``XMAG_REQUIRE_GPU=1``, or a provider list
  starting with a GPU provider and leaving out ``cpu``): the encoder's session must run on
  TensorRT or CUDA, checked against the offered providers before the build and against the
  session's own list after it; else ``GpuUnavailableError`` and no engine.
* TensorRT engines are cached per graph sha256, batch profile, precision, workspace and ORT
  version (``xmag._trt_cache``), built once under a file lock and published by a rename.
* Every float output is checked finite; NaN/Inf is an ``InferenceError`` (INFERENCE_FAILED),
  never an embedding.
* On GPUs a short last batch is padded to the batch size (no new shape, so no new cuDNN
  algorithm search or engine profile), and only the real rows are returned; tiles go up as
  uint8 and are normalised in the graph (``xmag._device_input``) unless
  ``XMAG_DEVICE_NORMALIZE=0``.
* Both ``onnxruntime`` and ``onnxruntime-gpu`` installed (they share one module: the last
  installed wins, often the CPU one) is reported once per process as a warning.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xmag._device_input import fuse_uint8_input, uint8_tiles
from xmag._trt_cache import engine_key, prepared_engine_dir, sha256_bytes
from xmag.errors import GpuUnavailableError, InferenceError, ModelPackageError
from xmag.preprocess import Preprocessor
from xmag.settings import (
    DEFAULT_GPU_BATCH_PROFILE,
    GPU_PROVIDERS,
    PROVIDER_NAMES,
    EngineSettings,
)

if TYPE_CHECKING:
    from xmag.package import InputSpec, ModelCard

__all__ = [
    "ORT_DISTRIBUTIONS",
    "ModelSession",
    "apply_card_hints",
    "check_onnxruntime_install",
    "choose_providers",
    "onnxruntime_distributions",
    "short_provider_name",
    "worker_device_env",
]

_MIB = 1024 * 1024
_log = logging.getLogger("xmag.runtime")

_SHORT = {v: k for k, v in PROVIDER_NAMES.items()}
_GPU_ORT = frozenset(PROVIDER_NAMES[p] for p in GPU_PROVIDERS)
#: Distributions that each install the ``onnxruntime`` Python module (one at a time, please).
ORT_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
)


def short_provider_name(ort_name: str) -> str:
    """ "CUDAExecutionProvider" -> "cuda" (unknown names are returned as they are)."""
    return _SHORT.get(ort_name, ort_name)


def choose_providers(
    settings: EngineSettings,
    available: Sequence[str],
    *,
    trt_profile: Mapping[str, tuple[int, ...]] | None = None,
    allow_tensorrt: bool = True,
    engine_dir: Path | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """Providers with their options, in preference order, limited to ``available``.

    Args:
        settings: preference order, device id, TensorRT options.
        available: what ``onnxruntime.get_available_providers()`` returned.
        trt_profile: input name -> (min, opt, max) batch sizes, with the rest of each input's
            shape in ``trt_shapes``; only used for TensorRT.
        allow_tensorrt: False for graphs TensorRT has no profile for (heads with a bag axis).
        engine_dir: the folder TensorRT engines go to (``ModelSession`` passes the folder keyed by
            the graph's weights); default: ``settings.trt_cache_dir`` itself.

    CPU is appended last when available (ORT places nodes a GPU provider cannot run there); when
    the settings require a GPU, ``ModelSession`` refuses a session whose first provider is CPU.
    """
    out: list[tuple[str, dict[str, Any]]] = []
    for name in _preference(settings):
        if name not in available:
            continue
        if name == "TensorrtExecutionProvider":
            if not allow_tensorrt:
                continue
            out.append((name, _trt_options(settings, trt_profile or {}, engine_dir)))
        elif name == "CUDAExecutionProvider":
            out.append((name, {"device_id": settings.cuda_device_id}))
        else:
            out.append((name, {}))
    return out


def apply_card_hints(
    settings: EngineSettings, card: ModelCard, available: Sequence[str] | None = None
) -> EngineSettings:
    """``settings`` with the card's runtime hints in every field the caller did not set.

    A field counts as set when it was given to the constructor or read from its ``XMAG_*``
    variable (pydantic's ``model_fields_set``); the settings' own defaults yield to the card:

    * ``variant``: the card's variant meant for the provider that will run the encoder (the first
      of ``choose_providers``): among the variants listing that provider, the one listing the
      fewest (the most specialised: int8 for CPU before fp32 for every provider), the first in the
      card on a tie; None (the encoder file) when none lists it.
    * ``trt_fp16``, ``trt_workspace_mb``: ``card.runtime``.
    * ``trt_batch_profile``: ``card.runtime.batch`` as (min, opt, max); ``batch_size``: its opt.
      On TensorRT or CUDA, a card that keeps the schema's CPU-sized default profile (1, 32, 64)
      gets ``DEFAULT_GPU_BATCH_PROFILE`` (1, 256, 512) instead; a profile the card chose is kept.

    Args:
        settings: the caller's settings (not modified).
        card: the model card whose hints apply.
        available: the providers onnxruntime offers (default: ``get_available_providers()``).

    Returns:
        A copy with the hints applied; the caller's explicit choices are kept as they are.
    """
    from xmag.package import BatchProfile

    explicit = settings.model_fields_set
    hints = card.runtime
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    runs_on = next((name for name in _preference(settings) if name in available), None)
    batch = (hints.batch.min, hints.batch.opt, hints.batch.max)
    if runs_on in _GPU_ORT and hints.batch == BatchProfile():
        batch = DEFAULT_GPU_BATCH_PROFILE
    update: dict[str, Any] = {
        "trt_fp16": hints.trt_fp16,
        "trt_workspace_mb": hints.trt_workspace_mb,
        "trt_batch_profile": batch,
        "batch_size": batch[1],
    }
    if runs_on is not None:
        update["variant"] = _variant_for(card, runs_on)
    return settings.model_copy(update={k: v for k, v in update.items() if k not in explicit})


def _variant_for(card: ModelCard, ort_provider: str) -> str | None:
    """Name of the card's variant meant for ``ort_provider`` (see ``apply_card_hints``)."""
    short = short_provider_name(ort_provider)
    meant = [
        (len(v.providers), i, v.name)
        for i, v in enumerate(card.variants)
        if ort_provider in v.providers or short in v.providers
    ]
    return min(meant)[2] if meant else None


def _preference(settings: EngineSettings) -> list[str]:
    """ORT provider names in the settings' order, CPU last when the settings leave it out."""
    wanted = [PROVIDER_NAMES[p] for p in settings.providers]
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")
    return wanted


def _trt_options(
    settings: EngineSettings, profile: Mapping[str, tuple[int, ...]], engine_dir: Path | None
) -> dict[str, Any]:
    cache = Path(settings.trt_cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    opts: dict[str, Any] = {
        "device_id": settings.cuda_device_id,
        "trt_fp16_enable": settings.trt_fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(engine_dir or cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
    }
    if settings.trt_workspace_mb is not None:
        opts["trt_max_workspace_size"] = settings.trt_workspace_mb * _MIB
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


# -- installation and devices -----------------------------------------------------------------
def onnxruntime_distributions(installed: Iterable[str] | None = None) -> list[str]:
    """The installed distributions that provide the ``onnxruntime`` module, sorted.

    Args:
        installed: distribution names to look at (default: ``importlib.metadata``'s).
    """
    if installed is None:
        from importlib.metadata import distributions

        installed = (d.metadata["Name"] or "" for d in distributions())
    names = {n.strip().lower().replace("_", "-") for n in installed if n}
    return sorted(names & set(ORT_DISTRIBUTIONS))


def check_onnxruntime_install(
    installed: Iterable[str] | None = None, *, warn: Callable[[str], None] | None = None
) -> str | None:
    """A warning when more than one onnxruntime distribution is installed, else None.

    ``onnxruntime`` and ``onnxruntime-gpu`` install the same module: whichever was installed last
    overwrote the other's files, so a GPU image can end up importing the CPU build (no CUDA, no
    TensorRT) or a mix of both. ``make install-gpu`` removes the CPU one first.
    """
    found = onnxruntime_distributions(installed)
    if len(found) < 2:
        return None
    extra = [n for n in found if n != "onnxruntime-gpu"] if "onnxruntime-gpu" in found else []
    fix = (
        f"pip uninstall -y {' '.join(extra)} && pip install --force-reinstall onnxruntime-gpu"
        if extra
        else "keep one of them"
    )
    message = (
        f"several onnxruntime distributions are installed ({', '.join(found)}); they share the "
        f"`onnxruntime` module, so which build runs is an accident of install order. Fix: {fix} "
        "(`make install-gpu` does this)."
    )
    (warn or _log.warning)(message)
    return message


@functools.cache
def _warn_install_once() -> None:
    check_onnxruntime_install()


@functools.cache
def preload_gpu_libraries() -> str | None:
    """Load CUDA and cuDNN for ONNX Runtime's GPU providers, once per process; what failed.

    ``onnxruntime-gpu``'s CUDA provider library carries no search path of its own, so CUDA and
    cuDNN installed as NVIDIA's pip wheels (``onnxruntime-gpu[cuda,cudnn]``, or beside torch) are
    not found by the loader and the session quietly lands on the CPU. ``onnxruntime.preload_dlls``
    (1.21+, the way ONNX Runtime documents for pip installs) loads them from those wheels, else
    from the default library path (a CUDA image's system libraries), before the first GPU
    session. It prints the libraries it could not load; they are logged and returned, so an
    error about a dropped GPU provider can name them. None: all loaded, or nothing to do (an
    onnxruntime without ``preload_dlls``; a CPU build returns at once).
    """
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return None
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            preload(cuda=True, cudnn=True, msvc=False)
    except Exception as exc:  # a broken NVIDIA folder must not stop the session from loading
        failed = f"{type(exc).__name__}: {exc}"
    else:
        failed = " ".join(printed.getvalue().split())
    if failed:
        _log.warning("loading CUDA/cuDNN for onnxruntime: %s", failed)
    return failed or None


def worker_device_env(slot: int, devices: Sequence[str]) -> dict[str, str]:
    """Environment giving supervised worker ``slot`` its GPU: round-robin over ``devices``.

    ``CUDA_VISIBLE_DEVICES`` makes that GPU the only one the worker sees, as device 0, so its
    ``XMAG_CUDA_DEVICE_ID`` is 0. More workers than devices share GPUs round-robin. No devices:
    nothing is set (every worker sees what the supervisor sees).
    """
    if not devices:
        return {}
    if slot < 0:
        raise ValueError(f"worker slot must be >= 0, got {slot}")
    return {"CUDA_VISIBLE_DEVICES": str(devices[slot % len(devices)]), "XMAG_CUDA_DEVICE_ID": "0"}


# -- batches ----------------------------------------------------------------------------------
def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` with its last row repeated to ``rows`` rows (real-looking input: no NaN, no
    denormals, so no slow path is hit on the padding)."""
    n = x.shape[0]
    if n >= rows or n == 0:
        return x
    return np.concatenate([x, np.repeat(x[-1:], rows - n, axis=0)])


def _check_finite(values: Mapping[str, np.ndarray], path: Path, provider: str) -> None:
    for name, v in values.items():
        if not np.issubdtype(v.dtype, np.floating):
            continue
        finite = np.isfinite(v)
        if finite.all():
            continue
        total = int(v.shape[0]) if v.ndim else 1
        bad = int((~finite).reshape(total, -1).any(axis=1).sum())
        raise InferenceError(
            f"{path.name} on {provider} returned NaN or Inf in {name!r} for {bad} of "
            f"{total} rows; these are not embeddings. On fp16 (TensorRT "
            "XMAG_TRT_FP16, an fp16 variant) an overflow is likely: run fp32 (XMAG_TRT_FP16=0 or "
            "XMAG_VARIANT=fp32) and compare; else re-export the model.",
            path=path,
            provider=provider,
            output=name,
            rows=bad,
        )


class ModelSession:
    """One ONNX graph loaded in ONNX Runtime; ``run`` maps input arrays to output arrays.

    Attributes:
        path: the ONNX file.
        provider: short name of the provider that actually runs the graph ("cpu", "cuda"...).
        providers: every provider the session holds, in order.
        takes_uint8: the encoder's input is uint8 NHWC tiles, normalised in the graph.
        engine_dir: the TensorRT engine folder (keyed by weights and build options), or None.
        pad_to: short batches are padded to this many rows (None: never).
    """

    def __init__(
        self,
        path: Path,
        settings: EngineSettings,
        *,
        trt_profile: Mapping[str, tuple[int, ...]] | None = None,
        allow_tensorrt: bool = True,
        input_spec: InputSpec | None = None,
    ) -> None:
        """Load ``path``.

        Args:
            trt_profile: TensorRT batch profile per input (see ``choose_providers``); the
                inputs named here are the batch inputs padded on GPUs.
            allow_tensorrt: False for heads; heads are also exempt from ``gpu_required``.
            input_spec: the card's input spec, for the encoder: lets the session take uint8
                tiles and normalise in the graph (``device_normalize``).

        Raises:
            GpuUnavailableError: the settings require a GPU and the session would run, or runs,
                on the CPU.
            ModelPackageError: ONNX Runtime could not load the graph.
        """
        import onnxruntime as ort

        _warn_install_once()
        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = settings.intra_op_threads
        opts.inter_op_num_threads = settings.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Our threads do the waiting; spinning ORT threads would steal the readers' cores (with
        # ORT_SEQUENTIAL there is no inter-op pool, but a caller's inter_op_threads > 1 must not
        # bring spinning back).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        available = ort.get_available_providers()
        require_gpu = settings.gpu_required and allow_tensorrt
        planned = choose_providers(settings, available, allow_tensorrt=allow_tensorrt)
        on_gpu = bool(planned) and planned[0][0] in _GPU_ORT
        gpu_libraries = preload_gpu_libraries() if on_gpu else None
        if require_gpu and not on_gpu:
            raise GpuUnavailableError(
                f"A GPU is required ({_why_required(settings)}) but this onnxruntime "
                f"{ort.__version__} offers {list(available)}: the encoder {self.path.name} would "
                "run on the CPU. Install the GPU build (`make install-gpu`, the worker-gpu image) "
                "and check the CUDA/cuDNN/TensorRT libraries and that a device is visible "
                "(nvidia-smi, CUDA_VISIBLE_DEVICES); or allow the CPU (XMAG_REQUIRE_GPU=0 with "
                "cpu in XMAG_PROVIDERS).",
                provider=planned[0][0] if planned else None,
                available=list(available),
            )

        model: str | bytes = str(self.path)
        profile = dict(trt_profile or {})
        normalize = settings.device_normalize if settings.device_normalize is not None else on_gpu
        self.takes_uint8 = bool(input_spec is not None and normalize)
        if input_spec is not None and self.takes_uint8:
            pre = Preprocessor.from_spec(input_spec)
            model = fuse_uint8_input(self.path, pre, input_spec.name)
            if input_spec.name in profile:  # (min, opt, max, 3, h, w) -> (min, opt, max, h, w, 3)
                b0, b1, b2, c, h, w = profile[input_spec.name]
                profile[input_spec.name] = (b0, b1, b2, h, w, c)
        self.engine_dir: Path | None = None

        def build(engine_dir: Path | None) -> Any:
            chosen = choose_providers(
                settings,
                available,
                trt_profile=profile,
                allow_tensorrt=allow_tensorrt,
                engine_dir=engine_dir,
            )
            try:
                return ort.InferenceSession(
                    model,
                    sess_options=opts,
                    providers=[name for name, _ in chosen],
                    provider_options=[o for _, o in chosen],
                )
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph/RuntimeException
                raise ModelPackageError(
                    f"ONNX Runtime could not load {self.path} with providers "
                    f"{[n for n, _ in chosen]} ({type(exc).__name__}: {exc}); check the "
                    "onnxruntime build (onnxruntime-gpu for CUDA/TensorRT) or re-export the model.",
                    path=self.path,
                ) from exc

        if planned and planned[0][0] == "TensorrtExecutionProvider":
            data = model if isinstance(model, bytes) else self.path.read_bytes()
            b = settings.trt_batch_profile
            key = engine_key(
                sha256_bytes(data),
                b,
                fp16=settings.trt_fp16,
                workspace_mb=settings.trt_workspace_mb,
                ort_version=ort.__version__,
            )
            self._session, self.engine_dir = prepared_engine_dir(
                Path(settings.trt_cache_dir), key, build
            )
        else:
            self._session = build(None)
        self.providers = [short_provider_name(p) for p in self._session.get_providers()]
        self.provider = self.providers[0]
        if require_gpu and self.provider not in GPU_PROVIDERS:
            raise GpuUnavailableError(
                f"A GPU is required ({_why_required(settings)}) but ONNX Runtime dropped "
                f"{planned[0][0]} while loading {self.path.name} and runs it on "
                f"{self.provider}: a CUDA, cuDNN or TensorRT library failed to load, or no GPU "
                "is visible (ORT's log names the library). The worker refuses to serve from the "
                "CPU."
                + (f" Loading CUDA/cuDNN reported: {gpu_libraries}" if gpu_libraries else ""),
                provider=self.provider,
                available=list(available),
                gpu_libraries=gpu_libraries,
            )
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        self._device_id = settings.cuda_device_id
        pad = settings.pad_batches if settings.pad_batches is not None else on_gpu
        self._batch_inputs = frozenset(profile)
        self.pad_to: int | None = None
        if pad and profile:
            b = settings.trt_batch_profile
            self.pad_to = min(settings.batch_size, b[2]) if b is not None else settings.batch_size

    def input_preprocessor(self, spec: InputSpec) -> Callable[[np.ndarray], np.ndarray]:
        """uint8 tiles -> this session's input: the reference ``Preprocessor`` on the host, or
        the tiles as they are when the graph normalises them (``takes_uint8``)."""
        return uint8_tiles if self.takes_uint8 else Preprocessor.from_spec(spec)

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the graph; returns the requested outputs (all by default) as host arrays.

        A batch shorter than ``pad_to`` is padded (last row repeated) and only its real rows
        are returned. Every float output is checked finite.

        Raises:
            InferenceError: ONNX Runtime failed on the inputs (out of memory, a kernel error),
                or an output holds NaN or Inf.
        """
        names = list(outputs) if outputs is not None else self.output_names
        feed = dict(inputs)
        rows = _batch_rows(feed, self._batch_inputs)
        padded = self.pad_to is not None and rows is not None and 0 < rows < self.pad_to
        if padded:
            assert self.pad_to is not None
            feed = {
                k: (_pad_rows(v, self.pad_to) if k in self._batch_inputs else v)
                for k, v in feed.items()
            }
        try:
            if self.provider in ("cuda", "tensorrt"):
                values = self._run_bound(feed, names)
            else:
                values = self._session.run(names, feed)
        except Exception as exc:  # ORT's exceptions are not part of a stable hierarchy
            shapes = {k: tuple(v.shape) for k, v in inputs.items()}
            raise InferenceError(
                f"ONNX Runtime failed running {self.path.name} on {self.provider} with inputs "
                f"{shapes} ({type(exc).__name__}: {exc}); lower the batch size "
                "(XMAG_BATCH_SIZE) if the device ran out of memory, else report it.",
                path=self.path,
                provider=self.provider,
            ) from exc
        result = dict(zip(names, values, strict=True))
        if padded:
            result = {k: v[:rows] for k, v in result.items()}  # only the real rows go back
        _check_finite(result, self.path, self.provider)
        return result

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


def _batch_rows(feed: Mapping[str, np.ndarray], batch_inputs: frozenset[str]) -> int | None:
    """Rows of the batch inputs (None when the session has none in ``feed``)."""
    for name in batch_inputs:
        if name in feed:
            return int(feed[name].shape[0])
    return None


def _why_required(settings: EngineSettings) -> str:
    if settings.require_gpu:
        return "XMAG_REQUIRE_GPU is set"
    return f"XMAG_PROVIDERS={','.join(settings.providers)} leaves out cpu"
