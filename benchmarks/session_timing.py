"""Encoder speed with one ONNX Runtime session per process (a helper of the int8 benchmarks).

Why a process each: on this 2-core VM, sessions that share a process do not run alike. Three
sessions of the same ``model.int8.onnx`` in one process, timed in rounds whose order rotated,
ran at x1.00, x1.10 and x1.15 of the first one's tiles/s, in the order they were created (not
the order they ran; a session created first and never run did not change it), and the run
second in a fixed order gained another ~4%. A benchmark that builds fp32 first and int8 after
it therefore favours int8. Here each variant runs in a child process of its own, in rounds
whose order rotates, and the medians over all rounds are reported. Fresh processes of one file
differ too (117-177 tiles/s in nine 5-second runs minutes apart, the machine otherwise idle), so
use several rounds: each gives every variant a new process.

The child: ``python benchmarks/session_timing.py TILES.npy --seconds S --file FILE --threads N``
(or ``--package DIR --variant V`` for ``Engine.encode``) prints one JSON line of per-call wall
and CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmag.runtime import ModelSession
from xmag.settings import EngineSettings

HERE = Path(__file__).resolve()


@dataclass(frozen=True)
class Rate:
    """Median tiles per wall second and per CPU second (the process's, all threads)."""

    wall: float
    cpu: float


def cpu_session(path: Path, threads: int) -> ModelSession:
    """The engine's own CPU session for ``path`` (``xmag.runtime.ModelSession``: its options,
    spinning off, output checks), with ``threads`` intra-op threads."""
    return ModelSession(path, EngineSettings(providers=["cpu"], intra_op_threads=threads))


def time_variants(
    variants: dict[str, list[str]], x: np.ndarray, *, seconds: float, rounds: int = 5
) -> dict[str, Rate]:
    """Median rates of each variant, each timed in its own process, ``rounds`` rotated rounds.

    Args:
        variants: name -> the child's arguments for the variant, from ``child_args``.
        x: the batch every call feeds (float32, preprocessed).
        seconds: timed seconds per variant and round (after one warm-up call).
    """
    names = list(variants)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    with tempfile.TemporaryDirectory(prefix="xmag-bench-timing-") as tmp:
        tiles = Path(tmp) / "tiles.npy"
        np.save(tiles, np.ascontiguousarray(x, dtype=np.float32))
        for r in range(rounds):
            for k in names[r % len(names) :] + names[: r % len(names)]:
                cmd = [sys.executable, str(HERE), str(tiles), "--seconds", str(seconds)]
                out = subprocess.run(
                    [*cmd, *variants[k]], check=True, capture_output=True, text=True
                ).stdout
                times = json.loads(out.strip().splitlines()[-1])
                wall[k] += times["wall"]
                cpu[k] += times["cpu"]
    n = len(x)
    return {k: Rate(n / float(np.median(wall[k])), n / float(np.median(cpu[k]))) for k in names}


def child_args(
    path: Path | None = None,
    *,
    threads: int = 2,
    package: Path | None = None,
    variant: str | None = None,
) -> list[str]:
    """The child's arguments for a graph file (``path``) or an engine (``package``, ``variant``)."""
    if package is not None:
        return ["--package", str(package), "--variant", str(variant)]
    return ["--file", str(path), "--threads", str(threads)]


def _child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tiles", type=Path)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--file", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--package", type=Path)
    parser.add_argument("--variant")
    args = parser.parse_args(argv)
    x = np.load(args.tiles)
    if args.package is not None:
        from xmag.engine import Engine

        engine = Engine.from_dir(args.package, EngineSettings(variant=args.variant, cache_dir=None))

        def call() -> None:
            engine.encode(x)
    else:
        session = cpu_session(args.file, args.threads)
        feed = {session.input_names[0]: x}
        first_output = session.output_names[:1]

        def call() -> None:
            session.run(feed, first_output)

    call()  # warm-up: allocations, kernel choice
    wall: list[float] = []
    cpu: list[float] = []
    t_end = time.perf_counter() + args.seconds
    while time.perf_counter() < t_end or len(wall) < 3:
        c0, t0 = time.process_time(), time.perf_counter()
        call()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(json.dumps({"wall": wall, "cpu": cpu}))


if __name__ == "__main__":
    _child(sys.argv[1:])
