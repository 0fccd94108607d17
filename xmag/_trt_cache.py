"""TensorRT engine cache folders: keyed by what determines the engine, built once, published whole.

ONNX Runtime names a cached engine after the model's file name and graph, not its weights: a new
encoder exported under the same name would load the old engine and serve stale embeddings. So
each engine lives in its own folder under the cache root, named by everything that determines it::

    <trt_cache_dir>/engines/<graph sha256>-b<min>_<opt>_<max>-<fp16|fp32>-ws<MiB>-ort<version>/
    <trt_cache_dir>/engines/<key>.lock        flock held while one process builds that engine
    <trt_cache_dir>/                          the TensorRT timing cache (shared: keyed by layer)

``prepared_engine_dir`` serialises builds across the workers sharing the cache (an exclusive
``flock``, so eight workers starting together build one engine, not eight) and makes them atomic:
the engine is built into ``<key>.tmp-<pid>-<random>`` and renamed to ``<key>`` only once the
session exists, so a worker killed mid-build (OOM, a healthcheck) leaves a temporary folder that
the next builder removes, never a half-written engine another worker would load. ``flock`` is
advisory and local: on a network filesystem shared by several machines, give each machine its
own cache volume.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

__all__ = ["ENGINES_DIR", "engine_key", "prepared_engine_dir", "sha256_bytes", "sha256_file"]

ENGINES_DIR = "engines"
_CHUNK = 1 << 20
_T = TypeVar("_T")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def engine_key(
    graph_sha256: str,
    profile: tuple[int, int, int] | None,
    *,
    fp16: bool,
    workspace_mb: int | None,
    ort_version: str,
) -> str:
    """Folder name of one engine: graph weights, batch profile, precision, workspace, ORT build.

    Args:
        graph_sha256: sha256 of the ONNX bytes given to ONNX Runtime (weights included).
        profile: (min, opt, max) batch sizes, None without an explicit profile.
        fp16: TensorRT fp16 kernels allowed.
        workspace_mb: builder workspace, None for ORT's default.
        ort_version: ``onnxruntime.__version__`` (it fixes the TensorRT version it links).
    """
    batch = "dyn" if profile is None else "_".join(str(b) for b in profile)
    ws = "auto" if workspace_mb is None else str(workspace_mb)
    precision = "fp16" if fp16 else "fp32"
    return f"{graph_sha256[:32]}-b{batch}-{precision}-ws{ws}-ort{ort_version}"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # blocks while another process builds this key
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def prepared_engine_dir(root: Path, key: str, build: Callable[[Path], _T]) -> tuple[_T, Path]:
    """Run ``build(folder)`` with the engine folder for ``key``, building it at most once.

    Under an exclusive lock on ``<root>/engines/<key>.lock``: when ``<key>`` exists (a complete
    engine), ``build`` gets it and loads the engine from it; otherwise ``build`` gets a fresh
    temporary folder to write the engine into, which is renamed to ``<key>`` when ``build``
    returns and holds files (a session that fell back from TensorRT wrote none: nothing is
    published). Leftover temporary folders of killed builders are removed first.

    Returns:
        ``build``'s result and the folder the engine is (or would be) in.
    """
    engines = Path(root) / ENGINES_DIR
    final = engines / key
    with _locked(engines / f"{key}.lock"):
        for stale in engines.glob(f"{key}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # we hold the lock: nobody is building
        if final.is_dir():
            return build(final), final
        tmp = engines / f"{key}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        try:
            result = build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if any(tmp.iterdir()):
            os.rename(tmp, final)  # atomic on one filesystem: a reader sees all or nothing
            return result, final
        shutil.rmtree(tmp, ignore_errors=True)
        return result, final
