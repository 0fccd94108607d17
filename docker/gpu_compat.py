"""Does the GPU image's CUDA stack match the onnxruntime-gpu it installs? Checked without a GPU.

Three places must agree, and used not to (``onnxruntime-gpu>=1.17`` resolved to a CUDA 13 build on
a CUDA 12.6 image, whose CUDA provider then failed to load and the worker served from the CPU):

* ``pyproject.toml``'s ``gpu`` extra pins ``onnxruntime-gpu==X``;
* ``docker/Dockerfile.worker-gpu`` declares ``ARG ORT_GPU_VERSION=X``, the base image's
  ``CUDA_VERSION`` and ``CUDNN_MAJOR``, and the ``TENSORRT_VERSION`` of the libraries it installs;
* ``docker/onnxruntime_gpu_compat.json`` says, per onnxruntime-gpu release, which CUDA range, cuDNN
  major and TensorRT version it is built against (from the official docs) and which NVIDIA wheels
  its METADATA names (``Requires-Dist``), which must name the same CUDA and cuDNN majors.

``python docker/gpu_compat.py`` prints each disagreement and exits 1 when there is one; the test
suite runs the same checks (``tests/test_gpu_path.py``). The image build itself then proves the
libraries load (``docker/gpu_check.py build``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "COMPAT_TABLE",
    "DOCKERFILE",
    "PYPROJECT",
    "dockerfile_args",
    "image_problems",
    "pinned_onnxruntime_gpu",
    "requires_dist_majors",
]

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile.worker-gpu"
COMPAT_TABLE = ROOT / "docker" / "onnxruntime_gpu_compat.json"
PYPROJECT = ROOT / "pyproject.toml"

_ARG = re.compile(r"^\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)=(\S+)\s*$", re.MULTILINE)
_PIN = re.compile(r"onnxruntime-gpu==([0-9][0-9A-Za-z.]*)")
_REQ = re.compile(r"^(nvidia-[a-z-]+?)(?:-cu(\d+))?\s*~=\s*(\d+)")


def dockerfile_args(text: str) -> dict[str, str]:
    """``ARG NAME=value`` defaults of a Dockerfile (the first default of each name)."""
    out: dict[str, str] = {}
    for name, value in _ARG.findall(text):
        out.setdefault(name, value.strip("\"'"))
    return out


def pinned_onnxruntime_gpu(pyproject_text: str) -> str | None:
    """The exact onnxruntime-gpu version the ``gpu`` extra pins (None: not pinned exactly)."""
    import tomllib

    extras = tomllib.loads(pyproject_text)["project"]["optional-dependencies"]
    for req in extras.get("gpu", []):
        m = _PIN.fullmatch(req.replace(" ", ""))
        if m:
            return m.group(1)
    return None


def requires_dist_majors(requires_dist: list[str]) -> dict[str, set[int]]:
    """CUDA and cuDNN majors named by a wheel's NVIDIA ``Requires-Dist`` lines.

    ``nvidia-cuda-runtime-cu12~=12.0`` and ``nvidia-cuda-runtime~=13.0`` name CUDA 12 and 13;
    ``nvidia-cudnn-cu12~=9.0`` names cuDNN 9 for CUDA 12.
    """
    cuda: set[int] = set()
    cudnn: set[int] = set()
    for line in requires_dist:
        m = _REQ.match(line.split(";")[0].strip())
        if not m:
            continue
        name, cu_suffix, major = m.group(1), m.group(2), int(m.group(3))
        if cu_suffix:
            cuda.add(int(cu_suffix))
        if name == "nvidia-cudnn":
            cudnn.add(major)
        elif name in ("nvidia-cuda-runtime", "nvidia-cuda-nvrtc"):
            cuda.add(major)
    return {"cuda": cuda, "cudnn": cudnn}


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def image_problems(args: dict[str, str], table: dict[str, Any], pinned: str | None) -> list[str]:
    """Every disagreement between the Dockerfile's ARGs, the extra's pin and the table."""
    problems: list[str] = []
    ort = args.get("ORT_GPU_VERSION")
    if pinned is None:
        problems.append("pyproject's gpu extra does not pin onnxruntime-gpu==<version>")
    if ort is None:
        problems.append("Dockerfile.worker-gpu has no ARG ORT_GPU_VERSION=<version>")
    if pinned and ort and pinned != ort:
        problems.append(f"the gpu extra pins onnxruntime-gpu {pinned}, the image {ort}")
    release = table.get("releases", {}).get(ort or pinned or "")
    if release is None:
        problems.append(
            f"onnxruntime-gpu {ort or pinned} is not in onnxruntime_gpu_compat.json; add its "
            "CUDA/cuDNN/TensorRT row from the official docs and its wheel's Requires-Dist"
        )
        return problems
    cuda = args.get("CUDA_VERSION", "")
    try:
        image_cuda = _minor(cuda)
    except ValueError:
        return [*problems, f"Dockerfile.worker-gpu's CUDA_VERSION {cuda!r} is not a version"]
    if image_cuda[0] != release["cuda_major"]:
        problems.append(
            f"onnxruntime-gpu {ort} is built for CUDA {release['cuda_major']}, the base image "
            f"has CUDA {cuda}"
        )
    else:
        low = _minor(release["cuda_min"])
        high = _minor(release["cuda_max"]) if release.get("cuda_max") else None
        if image_cuda < low or (high is not None and image_cuda > high):
            problems.append(
                f"onnxruntime-gpu {ort} supports CUDA {release['cuda_min']}-"
                f"{release.get('cuda_max')}, the base image has {cuda}"
            )
    if str(release["cudnn_major"]) != args.get("CUDNN_MAJOR"):
        problems.append(
            f"onnxruntime-gpu {ort} needs cuDNN {release['cudnn_major']}, the image declares "
            f"CUDNN_MAJOR={args.get('CUDNN_MAJOR')}"
        )
    trt = args.get("TENSORRT_VERSION", "")
    if release.get("tensorrt") is None:
        problems.append(f"no documented TensorRT version for onnxruntime-gpu {ort}")
    elif ".".join(trt.split(".")[:2]) != release["tensorrt"]:
        problems.append(
            f"onnxruntime-gpu {ort} is built against TensorRT {release['tensorrt']}, the image "
            f"installs {trt or 'an unpinned version'}"
        )
    majors = requires_dist_majors(release.get("requires_dist", []))
    if majors["cuda"] != {release["cuda_major"]}:
        problems.append(
            f"the wheel's Requires-Dist names CUDA {sorted(majors['cuda'])}, the table "
            f"{release['cuda_major']}"
        )
    if majors["cudnn"] != {release["cudnn_major"]}:
        problems.append(
            f"the wheel's Requires-Dist names cuDNN {sorted(majors['cudnn'])}, the table "
            f"{release['cudnn_major']}"
        )
    if args.get("TENSORRT_CUDA") and _minor(args["TENSORRT_CUDA"])[0] != image_cuda[0]:
        problems.append(
            f"the TensorRT packages are built for CUDA {args['TENSORRT_CUDA']}, "
            f"the image has {cuda}"
        )
    return problems


def main() -> int:
    args = dockerfile_args(DOCKERFILE.read_text())
    table = json.loads(COMPAT_TABLE.read_text())
    problems = image_problems(args, table, pinned_onnxruntime_gpu(PYPROJECT.read_text()))
    for p in problems:
        print(f"gpu image: {p}", file=sys.stderr)
    if not problems:
        print(
            f"gpu image: onnxruntime-gpu {args['ORT_GPU_VERSION']}, CUDA {args['CUDA_VERSION']}, "
            f"cuDNN {args['CUDNN_MAJOR']}, TensorRT {args['TENSORRT_VERSION']}: consistent"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
