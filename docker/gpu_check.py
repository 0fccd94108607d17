"""Proves inside the GPU image that onnxruntime can run the model on the GPU, or fails loudly.

    python3 gpu_check.py build --onnxruntime-gpu 1.22.0     # a RUN step of Dockerfile.worker-gpu
    python3 gpu_check.py session --model /models/default    # on a GPU host: docker run --gpus ...

``build`` (no GPU needed, ``docker build`` has none): exactly one onnxruntime distribution is
installed and it is onnxruntime-gpu at the pinned version; it offers the TensorRT and CUDA
providers; their shared libraries resolve every dependency (``ldd``: the CUDA, cuDNN and TensorRT
libraries of the image, with the sonames this build wants). When the build can see a GPU (the
legacy builder with the nvidia runtime as default, or ``GPU_CHECK_REQUIRE_SESSION=1``), it also
runs ``session`` on a tiny generated graph.

``session``: builds an ONNX Runtime session on the model package (or a tiny generated graph)
with TensorRT, CUDA, CPU and fails unless the session lists TensorRT or CUDA first: the check a
worker makes at start (``XMAG_REQUIRE_GPU=1``), runnable alone before a rollout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GPU = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _fail(message: str) -> int:
    print(f"gpu_check: FAIL: {message}", file=sys.stderr)
    return 1


def _gpu_visible() -> bool:
    if os.environ.get("GPU_CHECK_REQUIRE_SESSION", "") in ("1", "true", "yes"):
        return True
    return Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()


def _tiny_model(folder: Path) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gpu_check",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "gpu_check.onnx"
    onnx.save(model, str(path))
    return path


def check_build(expected_version: str) -> int:
    from importlib.metadata import version

    import onnxruntime as ort

    from xmag.runtime import onnxruntime_distributions

    dists = onnxruntime_distributions()
    if dists != ["onnxruntime-gpu"]:
        return _fail(f"installed onnxruntime distributions are {dists}, want only onnxruntime-gpu")
    got = version("onnxruntime-gpu")
    if got != expected_version:
        return _fail(f"onnxruntime-gpu {got} is installed, the image pins {expected_version}")
    offered = ort.get_available_providers()
    missing = [p for p in GPU if p not in offered]
    if missing:
        return _fail(f"onnxruntime {ort.__version__} does not offer {missing} (offers {offered})")
    capi = Path(ort.__file__).parent / "capi"
    ldd = shutil.which("ldd")
    for lib in ("libonnxruntime_providers_cuda.so", "libonnxruntime_providers_tensorrt.so"):
        path = capi / lib
        if not path.is_file():
            return _fail(f"{path} is missing")
        if ldd is None:
            return _fail("ldd is missing from the image")
        out = subprocess.run([ldd, str(path)], capture_output=True, text=True, check=False).stdout
        unresolved = [line.strip() for line in out.splitlines() if "not found" in line]
        if unresolved:
            return _fail(
                f"{lib} cannot load: {unresolved}; the image's CUDA/cuDNN/TensorRT do not match "
                f"onnxruntime-gpu {got} (docker/onnxruntime_gpu_compat.json)"
            )
    print(f"gpu_check: onnxruntime-gpu {got}: {offered}, provider libraries resolve")
    if _gpu_visible():
        return check_session(None)
    print("gpu_check: no GPU visible at build time; run `gpu_check.py session` on a GPU host")
    return 0


def check_session(model_dir: Path | None) -> int:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            path = _tiny_model(Path(tmp))
        else:
            from xmag.package import load_package

            path = load_package(model_dir).encoder_path
        providers = [
            ("TensorrtExecutionProvider", {"trt_engine_cache_enable": False}),
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ]
        session = ort.InferenceSession(str(path), providers=providers)
        used = session.get_providers()
    if used[0] not in GPU:
        return _fail(
            f"a session on {path.name} runs on {used}: no TensorRT or CUDA (ORT's log above "
            "names the library that failed to load, or no GPU is visible)"
        )
    print(f"gpu_check: a session on {path.name} runs on {used}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="static checks during docker build")
    build.add_argument("--onnxruntime-gpu", required=True, help="the pinned version")
    session = sub.add_parser("session", help="a session on the GPU (needs a GPU)")
    session.add_argument("--model", type=Path, default=None, help="model package folder")
    args = parser.parse_args(argv)
    if args.command == "build":
        return check_build(args.onnxruntime_gpu)
    return check_session(args.model)


if __name__ == "__main__":
    raise SystemExit(main())
