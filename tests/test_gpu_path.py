"""The GPU path, checked on a CPU: image and extra agree on CUDA, a worker asked for a GPU never
serves from the CPU, TensorRT engines are keyed by weights and built once, one GPU per worker,
padded batches give back their real rows, in-graph normalisation equals the reference, NaN is an
error, and a doubled onnxruntime install is reported.

Nothing here needs a GPU: ONNX Runtime's provider list and session are faked where a GPU build
would differ (the fakes record what the engine asks ONNX Runtime for).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tifffile
from onnx import TensorProto, helper, numpy_helper

from xmag._device_input import fuse_uint8_input, uint8_tiles
from xmag._trt_cache import ENGINES_DIR, engine_key, prepared_engine_dir
from xmag.engine import Engine
from xmag.errors import GpuUnavailableError, InferenceError, XmagUsageError
from xmag.package import BatchProfile, InputSpec, load_package
from xmag.preprocess import Preprocessor
from xmag.runtime import (
    ModelSession,
    _pad_rows,
    apply_card_hints,
    check_onnxruntime_install,
    onnxruntime_distributions,
    preload_gpu_libraries,
    worker_device_env,
)
from xmag.settings import DEFAULT_GPU_BATCH_PROFILE, EngineSettings

ROOT = Path(__file__).resolve().parent.parent
TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
_OrtSession = ort.InferenceSession  # the real class, before a test fakes it


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "docker" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compat() -> ModuleType:
    return _load_script("gpu_compat")


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _encoder(path: Path, *, weight: float = 1.0, dtype: int = TensorProto.FLOAT) -> Path:
    """A tiny 'encoder': pixels (B, 3, 4, 4) -> embedding (B, 2) = per-row sums x [w, -w]."""
    np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    w = numpy_helper.from_array(np.asarray([[weight, -weight]], np_dtype), "w")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["pixels", "axes"], ["s"], keepdims=1),
            helper.make_node("Reshape", ["s", "shape"], ["s2"]),
            helper.make_node("Mul", ["s2", "w"], ["embedding"]),
        ],
        "enc",
        [helper.make_tensor_value_info("pixels", dtype, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("embedding", dtype, ["batch", 2])],
        [
            w,
            numpy_helper.from_array(np.asarray([1, 2, 3], np.int64), "axes"),
            numpy_helper.from_array(np.asarray([-1, 1], np.int64), "shape"),
        ],
    )
    return _save(graph, path)


def _identity(path: Path, side: int, dtype: int = TensorProto.FLOAT) -> Path:
    """'Encoder' that returns its input: shows exactly what the graph was fed."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["pixels"], ["embedding"])],
        "id",
        [helper.make_tensor_value_info("pixels", dtype, ["batch", 3, side, side])],
        [helper.make_tensor_value_info("embedding", dtype, ["batch", 3, side, side])],
    )
    return _save(graph, path)


def _constant_output(path: Path, value: float) -> Path:
    """(B, 3, 4, 4) -> (B, 2): the row sums times ``value`` (NaN or Inf poisons every row)."""
    c = numpy_helper.from_array(np.asarray([[value, 1.0]], np.float32), "c")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["pixels", "axes"], ["s"], keepdims=1),
            helper.make_node("Reshape", ["s", "shape"], ["s2"]),
            helper.make_node("Mul", ["s2", "c"], ["embedding"]),
        ],
        "nan",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 2])],
        [
            c,
            numpy_helper.from_array(np.asarray([1, 2, 3], np.int64), "axes"),
            numpy_helper.from_array(np.asarray([-1, 1], np.int64), "shape"),
        ],
    )
    return _save(graph, path)


def _cpu(**kw: Any) -> EngineSettings:
    return EngineSettings(**{"providers": ["cpu"], "intra_op_threads": 1, **kw})


# -- 1. the image's CUDA stack and the pinned onnxruntime-gpu ------------------------------------
def test_the_gpu_extra_and_the_image_pin_the_same_onnxruntime_gpu(compat: ModuleType) -> None:
    pinned = compat.pinned_onnxruntime_gpu((ROOT / "pyproject.toml").read_text())
    args = compat.dockerfile_args((ROOT / "docker" / "Dockerfile.worker-gpu").read_text())
    assert pinned is not None and re.fullmatch(r"\d+\.\d+\.\d+", pinned)
    assert args["ORT_GPU_VERSION"] == pinned


def test_the_pinned_onnxruntime_gpu_matches_the_base_image_cuda_cudnn_and_tensorrt(
    compat: ModuleType,
) -> None:
    text = (ROOT / "docker" / "Dockerfile.worker-gpu").read_text()
    args = compat.dockerfile_args(text)
    table = json.loads((ROOT / "docker" / "onnxruntime_gpu_compat.json").read_text())
    pinned = compat.pinned_onnxruntime_gpu((ROOT / "pyproject.toml").read_text())
    assert compat.image_problems(args, table, pinned) == []
    # The base image really is the CUDA the ARG names, and TensorRT is installed at the pin.
    assert re.search(r"^FROM nvidia/cuda:\$\{CUDA_VERSION\}-cudnn-runtime-", text, re.M)
    for lib in ("libnvinfer10", "libnvinfer-plugin10", "libnvonnxparsers10"):
        assert f'"{lib}=${{TENSORRT_VERSION}}-1+cuda${{TENSORRT_CUDA}}"' in text
    # The host driver the README and the Dockerfile promise is the table's for that CUDA.
    cuda_mm = ".".join(args["CUDA_VERSION"].split(".")[:2])
    driver = table["driver_min"][cuda_mm]["native"]
    assert driver in text and driver in (ROOT / "docker" / "README.md").read_text()


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"CUDA_VERSION": "12.6.3"}, None),  # inside 12.0-12.8: fine
        ({"ORT_GPU_VERSION": "1.31.1"}, "built for CUDA 13"),  # the old unpinned resolution
        ({"CUDA_VERSION": "13.0.1"}, "built for CUDA 12"),
        ({"CUDNN_MAJOR": "8"}, "needs cuDNN 9"),
        ({"TENSORRT_VERSION": "10.13.3.9"}, "TensorRT 10.9"),
        ({"ORT_GPU_VERSION": "1.99.0"}, "not in onnxruntime_gpu_compat.json"),
    ],
)
def test_the_image_check_catches_each_kind_of_mismatch(
    compat: ModuleType, change: dict[str, str], complaint: str | None
) -> None:
    args = compat.dockerfile_args((ROOT / "docker" / "Dockerfile.worker-gpu").read_text())
    table = json.loads((ROOT / "docker" / "onnxruntime_gpu_compat.json").read_text())
    args = {**args, **change}
    problems = compat.image_problems(args, table, args["ORT_GPU_VERSION"])
    if complaint is None:
        assert problems == []
    else:
        assert any(complaint in p for p in problems), problems


def test_the_table_s_cuda_and_cudnn_agree_with_the_wheels_requires_dist(
    compat: ModuleType,
) -> None:
    table = json.loads((ROOT / "docker" / "onnxruntime_gpu_compat.json").read_text())
    for version, row in table["releases"].items():
        majors = compat.requires_dist_majors(row["requires_dist"])
        assert majors == {"cuda": {row["cuda_major"]}, "cudnn": {row["cudnn_major"]}}, version


def test_the_pinned_wheel_s_metadata_on_pypi_is_the_table_s(
    compat: ModuleType, tmp_path: Path
) -> None:
    """Re-reads Requires-Dist from PyPI (metadata only, no wheel download) when PyPI answers."""
    pinned = compat.pinned_onnxruntime_gpu((ROOT / "pyproject.toml").read_text())
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed"]
    cmd += ["--quiet", "--report", str(report), f"onnxruntime-gpu=={pinned}"]
    try:
        subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"PyPI not reachable for the metadata check: {exc}")
    meta = json.loads(report.read_text())["install"][0]["metadata"]
    nvidia = sorted(r for r in meta.get("requires_dist", []) if r.startswith("nvidia-"))
    table = json.loads((ROOT / "docker" / "onnxruntime_gpu_compat.json").read_text())
    assert nvidia == sorted(table["releases"][pinned]["requires_dist"])


def test_the_image_build_runs_the_provider_check_and_makes_its_folders_for_the_worker() -> None:
    text = (ROOT / "docker" / "Dockerfile.worker-gpu").read_text()
    check = text.index('gpu_check.py build --onnxruntime-gpu "${ORT_GPU_VERSION}"')
    user = text.index("USER xmag")
    assert text.index("pip install") < check < user
    made = re.search(r"mkdir -p ([^\\\n&]*)", text)
    owned = re.search(r"chown xmag:xmag ([^\n]*)", text)
    assert made is not None and owned is not None and made.start() < owned.start() < user
    assert {"/data", "/cache/trt"} <= set(made.group(1).split()) & set(owned.group(1).split())
    for name in ("Dockerfile.worker-cpu", "Dockerfile.api"):
        other = (ROOT / "docker" / name).read_text()
        owned = re.search(r"chown xmag:xmag ([^\n]*)", other)
        assert owned is not None and "/data" in owned.group(1).split(), name
        assert owned.start() < other.index("USER xmag"), name


def test_the_build_check_refuses_a_cpu_onnxruntime() -> None:
    """This machine has the CPU onnxruntime: the image's build step must fail on it."""
    gpu_check = _load_script("gpu_check")
    assert gpu_check.check_build(ort.__version__) == 1


# -- 2. a worker asked for a GPU never serves from the CPU ---------------------------------------
@pytest.mark.parametrize(
    ("providers", "require", "required"),
    [
        (["tensorrt", "cuda", "cpu"], False, False),  # the default may degrade to the CPU
        (["cuda", "cpu"], True, True),  # XMAG_REQUIRE_GPU=1
        (["cuda"], False, True),  # a GPU first and no cpu fallback allowed
        (["tensorrt", "cuda"], False, True),
        (["cpu"], False, False),
    ],
)
def test_which_settings_require_a_gpu(providers: list[str], require: bool, required: bool) -> None:
    settings = EngineSettings(providers=providers, require_gpu=require)  # type: ignore[arg-type]
    assert settings.gpu_required is required


def test_require_gpu_and_gpu_devices_are_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XMAG_REQUIRE_GPU", "1")
    monkeypatch.setenv("XMAG_GPU_DEVICES", "0, 1,GPU-3a23c669")
    s = EngineSettings()
    assert s.require_gpu and s.gpu_required
    assert s.gpu_devices == ["0", "1", "GPU-3a23c669"]


def test_a_gpu_required_session_on_a_cpu_only_onnxruntime_is_refused(tmp_path: Path) -> None:
    path = _encoder(tmp_path / "model.onnx")
    for settings in (
        EngineSettings(providers=["cuda", "cpu"], require_gpu=True),
        EngineSettings(providers=["cuda"]),
    ):
        with pytest.raises(GpuUnavailableError) as info:
            ModelSession(path, settings)
        assert info.value.code == "INVALID_SETTINGS"
        assert "CPUExecutionProvider" in str(info.value.fields["available"])
    # Without the requirement the same machine degrades to the CPU, as before.
    assert ModelSession(path, EngineSettings(providers=["cuda", "cpu"])).provider == "cpu"


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_a_gpu_provider_dropped_while_loading_is_caught_after_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ORT offers CUDA (fake list) but the session lands on the CPU, as when libcudnn is missing."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    path = _encoder(tmp_path / "model.onnx")
    with pytest.raises(GpuUnavailableError, match="dropped CUDAExecutionProvider"):
        ModelSession(path, EngineSettings(providers=["cuda", "cpu"], require_gpu=True))


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_cuda_libraries_are_preloaded_once_and_the_ones_that_failed_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime-gpu from pip finds NVIDIA's CUDA wheels only through ``preload_dlls``; what it
    could not load is in the error when the GPU provider is then dropped (fake provider list and
    preload, which prints its failures as ONNX Runtime's does: there is no GPU here)."""
    calls: list[tuple[bool, bool, bool]] = []

    def fake_preload(
        cuda: bool = True, cudnn: bool = True, msvc: bool = True, directory: str | None = None
    ) -> None:
        calls.append((cuda, cudnn, msvc))
        print("Failed to load libcublasLt.so.12: cannot open shared object file")

    monkeypatch.setattr(ort, "preload_dlls", fake_preload, raising=False)
    preload_gpu_libraries.cache_clear()
    try:
        path = _encoder(tmp_path / "model.onnx")
        assert ModelSession(path, _cpu()).provider == "cpu"
        assert calls == []  # a CPU plan loads no CUDA
        monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
        with pytest.raises(GpuUnavailableError, match=r"reported: Failed to load libcublasLt"):
            ModelSession(path, EngineSettings(providers=["cuda", "cpu"], require_gpu=True))
        # Not required: the same failure degrades to the CPU, and loading ran once per process.
        assert ModelSession(path, EngineSettings(providers=["cuda", "cpu"])).provider == "cpu"
        assert calls == [(True, True, False)]

        def broken_preload(**_: object) -> None:
            raise OSError("nvidia/cudnn/lib: permission denied")

        monkeypatch.setattr(ort, "preload_dlls", broken_preload)
        preload_gpu_libraries.cache_clear()
        with pytest.raises(GpuUnavailableError, match="OSError: nvidia/cudnn/lib"):
            ModelSession(path, EngineSettings(providers=["cuda"]))
    finally:
        preload_gpu_libraries.cache_clear()


def test_the_engine_refuses_to_build_without_the_gpu_it_was_told_to_use(
    default_package: Path,
) -> None:
    with pytest.raises(GpuUnavailableError, match="XMAG_REQUIRE_GPU"):
        Engine.from_dir(default_package, EngineSettings(require_gpu=True, intra_op_threads=1))


# -- 3 + 5. TensorRT engines keyed by weights, built once, published whole ----------------------
class _FakeTrtSession:
    """Stands in for a TensorRT session: writes an 'engine' into its cache folder like ORT."""

    built: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, model: Any, sess_options: Any, providers: list[str], **kw: Any) -> None:
        opts = dict(zip(providers, kw["provider_options"], strict=True))
        self.providers = providers
        trt = opts.get(TRT)
        if trt is not None:
            folder = Path(trt["trt_engine_cache_path"])
            if not any(folder.glob("*.engine")):
                time.sleep(0.05)  # a build takes time; another worker must wait, not build too
                (folder / "TensorrtExecutionProvider_sm90.engine").write_bytes(b"engine")
                _FakeTrtSession.built.append(trt)
        self._cpu = _OrtSession(model if isinstance(model, bytes) else str(model), providers=[CPU])

    def get_providers(self) -> list[str]:
        return self.providers

    def get_inputs(self) -> Any:
        return self._cpu.get_inputs()

    def get_outputs(self) -> Any:
        return self._cpu.get_outputs()

    def run(self, names: Any, feed: Any) -> Any:
        return self._cpu.run(names, feed)


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_FakeTrtSession]]:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", _FakeTrtSession)
    monkeypatch.setattr(ModelSession, "_run_bound", lambda self, f, n: self._session.run(n, f))
    _FakeTrtSession.built = []
    yield _FakeTrtSession


def _trt_settings(cache: Path, **kw: Any) -> EngineSettings:
    base = {"trt_cache_dir": cache, "trt_batch_profile": (1, 4, 8), "batch_size": 4}
    return EngineSettings(**{**base, "intra_op_threads": 1, **kw})


def test_the_engine_folder_changes_with_the_weights_not_the_file_name(
    tmp_path: Path, fake_trt: type[_FakeTrtSession]
) -> None:
    cache = tmp_path / "trt"
    profile = {"pixels": (1, 4, 8, 3, 4, 4)}
    a = ModelSession(_encoder(tmp_path / "model.onnx"), _trt_settings(cache), trt_profile=profile)
    # Same file name, same graph, new weights (a re-export): a new engine, not the stale one.
    new_weights = _encoder(tmp_path / "model.onnx", weight=2.0)
    b = ModelSession(new_weights, _trt_settings(cache), trt_profile=profile)
    assert a.provider == b.provider == "tensorrt"
    assert a.engine_dir is not None and b.engine_dir is not None
    assert a.engine_dir != b.engine_dir and a.engine_dir.parent == cache / ENGINES_DIR
    assert len(fake_trt.built) == 2
    # Profile, precision and workspace are in the key too.
    c = ModelSession(new_weights, _trt_settings(cache, trt_fp16=False), trt_profile=profile)
    assert c.engine_dir not in (a.engine_dir, b.engine_dir)
    keys = {
        engine_key("ab" * 32, p, fp16=f, workspace_mb=w, ort_version="1.22.0")
        for p in ((1, 4, 8), (1, 8, 8))
        for f in (True, False)
        for w in (None, 2048)
    }
    assert len(keys) == 8
    # The same weights again load the published engine: no second build.
    again = ModelSession(tmp_path / "model.onnx", _trt_settings(cache), trt_profile=profile)
    assert again.engine_dir == b.engine_dir and len(fake_trt.built) == 3


def test_workers_starting_together_build_one_engine_and_the_others_load_it(
    tmp_path: Path, fake_trt: type[_FakeTrtSession]
) -> None:
    path = _encoder(tmp_path / "model.onnx")
    folders: list[Path | None] = []

    def start() -> None:
        profile = {"pixels": (1, 4, 8, 3, 4, 4)}
        s = ModelSession(path, _trt_settings(tmp_path / "trt"), trt_profile=profile)
        folders.append(s.engine_dir)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_trt.built) == 1
    assert len(set(folders)) == 1
    engines = tmp_path / "trt" / ENGINES_DIR
    assert not list(engines.glob("*.tmp-*"))  # the build folder was renamed into place


def test_an_engine_build_that_dies_leaves_nothing_another_worker_would_load(
    tmp_path: Path,
) -> None:
    def crash(folder: Path) -> None:
        (folder / "half.engine").write_bytes(b"half")
        raise MemoryError("killed mid-build")

    with pytest.raises(MemoryError):
        prepared_engine_dir(tmp_path, "k", crash)
    engines = tmp_path / ENGINES_DIR
    assert not (engines / "k").exists() and not list(engines.glob("k.tmp-*"))
    # A process killed outright leaves its temporary folder: the next builder removes it.
    (engines / "k.tmp-999-dead").mkdir()
    (engines / "k.tmp-999-dead" / "half.engine").write_bytes(b"half")
    seen: list[list[str]] = []
    _, final = prepared_engine_dir(
        tmp_path,
        "k",
        lambda f: (
            seen.append(sorted(p.name for p in f.iterdir())) or (f / "x.engine").write_bytes(b"ok")
        ),
    )
    assert seen == [[]] and final == engines / "k"
    assert not list(engines.glob("k.tmp-*"))
    assert (final / "x.engine").read_bytes() == b"ok"


def test_a_session_that_fell_back_from_tensorrt_publishes_no_engine(tmp_path: Path) -> None:
    _, final = prepared_engine_dir(tmp_path, "k", lambda f: None)
    assert not final.exists()


# -- 4. one GPU per worker ----------------------------------------------------------------------
def test_supervised_workers_get_gpus_round_robin() -> None:
    devices = ["0", "1", "2"]
    seen = [worker_device_env(slot, devices)["CUDA_VISIBLE_DEVICES"] for slot in range(7)]
    assert seen == ["0", "1", "2", "0", "1", "2", "0"]
    # The only device a worker sees is its device 0.
    assert worker_device_env(4, devices)["XMAG_CUDA_DEVICE_ID"] == "0"
    assert worker_device_env(0, []) == {}
    with pytest.raises(ValueError):
        worker_device_env(-1, devices)


def test_xmag_serve_starts_each_worker_on_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess as sp

    from service.cli import _WorkerSupervisor

    envs: list[dict[str, str]] = []
    monkeypatch.setattr(sp, "Popen", lambda *a, **kw: envs.append(kw["env"]))
    supervisor = _WorkerSupervisor(3, {"REDIS_URL": "redis://x"}, ["0", "1"])
    for slot in range(3):
        supervisor._spawn(slot)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0"]
    assert all(e["REDIS_URL"] == "redis://x" and e["XMAG_CUDA_DEVICE_ID"] == "0" for e in envs)
    envs.clear()
    _WorkerSupervisor(1, {"REDIS_URL": "redis://x"})._spawn(0)  # no list: nothing imposed
    assert "CUDA_VISIBLE_DEVICES" not in envs[0]


def test_compose_pins_each_gpu_worker_to_its_own_device() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
    ids = []
    for name, service in compose["services"].items():
        if not name.startswith("worker-gpu"):
            continue
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device  # count: 1 replicas all land on the same GPU
        ids.extend(device["device_ids"])
        assert service["environment"]["XMAG_REQUIRE_GPU"] == "1"
    assert len(ids) >= 2 and len(ids) == len(set(ids))


# -- 8. GPU batch sizes, padded last batch -------------------------------------------------------
def test_the_pad_returns_exactly_the_real_rows(tmp_path: Path) -> None:
    x = np.arange(5 * 3 * 4 * 4, dtype=np.float32).reshape(5, 3, 4, 4)
    padded = _pad_rows(x, 8)
    assert padded.shape[0] == 8
    np.testing.assert_array_equal(padded[:5], x)
    assert _pad_rows(x, 4) is x  # never cut

    path = _encoder(tmp_path / "model.onnx")
    plain = ModelSession(path, _cpu(), trt_profile={"pixels": (1, 8, 8, 3, 4, 4)})
    padding = ModelSession(
        path, _cpu(pad_batches=True, batch_size=8), trt_profile={"pixels": (1, 8, 8, 3, 4, 4)}
    )
    assert plain.pad_to is None and padding.pad_to == 8
    seen: list[tuple[int, ...]] = []

    class Spy:  # records the shapes ONNX Runtime is given
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def run(self, names: Any, feed: dict[str, np.ndarray]) -> Any:
            seen.append(feed["pixels"].shape)
            return self.inner.run(names, feed)

    padding._session = Spy(padding._session)
    for n in (1, 5, 8):
        got = padding.run({"pixels": x[:n] if n <= 5 else np.concatenate([x, x[:3]])})
        want = plain.run({"pixels": x[:n] if n <= 5 else np.concatenate([x, x[:3]])})
        assert got["embedding"].shape == (n, 2)
        np.testing.assert_array_equal(got["embedding"], want["embedding"])
    assert seen == [(8, 3, 4, 4)] * 3  # one shape only: no new algorithm search on a GPU


def test_gpu_batch_defaults_replace_the_cpu_sized_profile_but_not_a_chosen_one(
    default_package: Path,
) -> None:
    card = load_package(default_package).card
    default_card = card.model_copy(
        update={"runtime": card.runtime.model_copy(update={"batch": BatchProfile()})}
    )
    on_gpu = apply_card_hints(EngineSettings(), default_card, [TRT, CUDA, CPU])
    assert on_gpu.trt_batch_profile == DEFAULT_GPU_BATCH_PROFILE
    assert on_gpu.batch_size == DEFAULT_GPU_BATCH_PROFILE[1] >= 256
    on_cpu = apply_card_hints(EngineSettings(), default_card, [CPU])
    assert on_cpu.trt_batch_profile == (1, 32, 64) and on_cpu.batch_size == 32
    chosen = apply_card_hints(EngineSettings(), card, [TRT, CUDA, CPU])
    b = card.runtime.batch
    assert chosen.trt_batch_profile == (b.min, b.opt, b.max)


# -- 9. uint8 upload, normalisation in the graph -------------------------------------------------
@pytest.fixture(scope="module")
def real_tiles(slides_dir: Path, patches_dir: Path) -> np.ndarray:
    from xmag.params import TilingParams
    from xmag.plan import plan_slide
    from xmag.readers import open_slide
    from xmag.tiles import read_tile

    tiles = [tifffile.imread(p) for p in sorted((patches_dir / "nct-crc-he").glob("*.tif"))]
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as reader:
        plan = plan_slide(reader, TilingParams(tile_px=224, target_mpp=2.0))
        for index in plan.grid.kept_indices()[:4]:
            tiles.append(read_tile(reader, plan.grid, plan.level, int(index)))
    return np.stack(tiles)


@pytest.mark.parametrize(
    "spec",
    [
        InputSpec(),  # ImageNet statistics, RGB, float32: the XMAG student
        InputSpec(channel_order="BGR", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)),
        InputSpec(dtype="float16"),
    ],
)
def test_the_in_graph_normalisation_equals_the_reference_on_real_tiles(
    tmp_path: Path, real_tiles: np.ndarray, spec: InputSpec
) -> None:
    dtype = TensorProto.FLOAT16 if spec.dtype == "float16" else TensorProto.FLOAT
    path = _identity(tmp_path / "id.onnx", 224, dtype)
    session = ModelSession(path, _cpu(device_normalize=True), input_spec=spec)
    assert session.takes_uint8 and session.input_preprocessor(spec) is uint8_tiles
    got = session.run({"pixels": real_tiles})["embedding"]
    want = Preprocessor.from_spec(spec)(real_tiles)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)  # value for value, not approximately
    # The check can fail: the same tiles with the wrong channel order differ.
    assert not np.array_equal(got, Preprocessor.from_spec(spec)(real_tiles[..., ::-1].copy()))


def test_the_engine_embeds_the_same_with_uint8_upload(
    default_package: Path, real_tiles: np.ndarray
) -> None:
    host = Engine.from_dir(default_package, _cpu(batch_size=4))
    device = Engine.from_dir(default_package, _cpu(batch_size=4, device_normalize=True))
    assert device.encoder.takes_uint8 and not host.encoder.takes_uint8
    assert device.encoder._session.get_inputs()[0].type == "tensor(uint8)"
    np.testing.assert_allclose(
        device.embed_tiles(real_tiles), host.embed_tiles(real_tiles), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(XmagUsageError):
        device.preprocess(real_tiles.astype(np.float32))


def test_a_fused_graph_refuses_an_input_it_cannot_replace(tmp_path: Path) -> None:
    path = _identity(tmp_path / "id.onnx", 4)
    # Fusing is deterministic: the TensorRT engine key (its sha256) survives a restart.
    assert fuse_uint8_input(path, Preprocessor(), "pixels") == fuse_uint8_input(
        path, Preprocessor(), "pixels"
    )
    with pytest.raises(ValueError, match="no input 'image'"):
        fuse_uint8_input(path, Preprocessor(), "image")
    with pytest.raises(ValueError, match="dtype"):
        fuse_uint8_input(path, Preprocessor(dtype="float16"), "pixels")


# -- 10. NaN and Inf are errors, not embeddings --------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_an_encoder_returning_nan_or_inf_fails_with_inference_failed(
    tmp_path: Path, value: float
) -> None:
    session = ModelSession(_constant_output(tmp_path / "bad.onnx", value), _cpu())
    with pytest.raises(InferenceError) as info:
        session.run({"pixels": np.ones((3, 3, 4, 4), np.float32)})
    assert info.value.code == "INFERENCE_FAILED"
    assert "NaN or Inf" in info.value.message and info.value.fields["rows"] == 3
    # The check can pass: a finite model's output goes through.
    ok = ModelSession(_constant_output(tmp_path / "ok.onnx", 2.0), _cpu())
    assert ok.run({"pixels": np.ones((3, 3, 4, 4), np.float32)})["embedding"].shape == (3, 2)


# -- 11. one onnxruntime at a time ---------------------------------------------------------------
def test_both_onnxruntime_builds_installed_is_reported_with_the_fix() -> None:
    warned: list[str] = []
    msg = check_onnxruntime_install(
        ["numpy", "onnxruntime", "onnxruntime_gpu", "onnx"], warn=warned.append
    )
    assert msg is not None and warned == [msg]
    assert "onnxruntime, onnxruntime-gpu" in msg and "pip uninstall -y onnxruntime" in msg
    assert check_onnxruntime_install(["onnxruntime-gpu", "onnx"], warn=warned.append) is None
    assert check_onnxruntime_install(["onnxruntime"], warn=warned.append) is None
    assert len(warned) == 1
    # This environment: the CPU build only.
    assert onnxruntime_distributions() == ["onnxruntime"]


def test_make_install_gpu_removes_the_cpu_build_before_installing_the_gpu_one() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ninstall-gpu:", 1)[1].split("\n\n", 1)[0]
    assert recipe.index("pip uninstall -y -q onnxruntime") < recipe.index('".[gpu')


# -- 6. a worker building its engine keeps its heartbeat and says why it is not ready ------------
class _Records:
    def __init__(self) -> None:
        self.beats: list[dict[str, str | int]] = []

    def heartbeat(self, worker_id: str, info: dict[str, str | int]) -> None:
        self.beats.append(dict(info))


def test_a_worker_loading_its_engine_keeps_its_heartbeat_and_says_building_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service import worker as worker_module
    from service.settings import ServiceSettings

    settings = ServiceSettings(
        data_dir=tmp_path, worker_heartbeat_s=0.05, worker_heartbeat_file=tmp_path / "hb"
    )
    records = _Records()
    monkeypatch.setattr(worker_module, "JobStore", lambda client, ns: records)
    monkeypatch.setattr(worker_module, "redis_client", lambda url: None)
    beats_while_loading: list[int] = []

    def slow_build(_: object) -> object:  # a TensorRT build outlasting a few heartbeats
        time.sleep(0.4)
        beats_while_loading.append(len(records.beats))
        raise GpuUnavailableError("no GPU here")

    monkeypatch.setattr(worker_module, "load_engine", slow_build)
    with pytest.raises(GpuUnavailableError):
        worker_module.run_worker(settings, "redis://unused")
    assert beats_while_loading[0] >= 3  # beat on start, then every 0.05 s while building
    assert (tmp_path / "hb").is_file()
    assert {b["status"] for b in records.beats[:-1]} == {"building engine"}
    assert all(b["model_loaded"] == 0 for b in records.beats)
    assert records.beats[-1]["status"] == "failed: [INVALID_SETTINGS] no GPU here"
