"""The threaded tile pipeline: reads and preprocessing on one side, the model on the other.

    [producer thread] iter_tile_batches (parallel, coalesced reads) -> preprocess -> bounded queue
    [caller thread]   encode, batch after batch -> tile embeddings [N, D]

A pipeline, not a loop: a producer thread pulls tile batches from the core's parallel reader
(which itself keeps ``queue_depth`` batches in flight) and turns them into model input while the
caller's thread runs the previous batch through the model; the queue between them holds at most
``queue_depth`` batches, so memory is bounded whatever the slide size (only the [N, D] embeddings
grow with the slide). Progress is reported and cancellation checked between batches.

``TileFeed`` is the producer half on its own: the engine starts it before a slide's turn on the
model (``xmag.inflight``), so the first batches are read while another slide is being encoded.

Priorities, not more threads: on a CPU the encoder's ORT threads and the reader threads share
the same cores. With ``reader_nice`` > 0 (``XMAG_READER_NICE``, default
``xmag.settings.DEFAULT_READER_NICE``) the producer thread raises its own niceness
(``lower_thread_priority``) before it starts the reader pool, whose threads
inherit it (Linux threads are created with their creator's niceness). When the model and a read
are both runnable the scheduler gives the model the core; reads fill the gaps (ORT's
synchronisation points, the Python between batches) and the queue keeps the model fed. The
caller's thread, which runs the model, is never touched.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from xmag.errors import JobCanceledError, XmagUsageError
from xmag.plan import SlidePlan
from xmag.readers import SlideReader
from xmag.tiles import iter_tile_batches

__all__ = [
    "CancelFn",
    "PipelineRun",
    "ProgressFn",
    "TileFeed",
    "lower_thread_priority",
    "run_pipeline",
    "thread_niceness",
]

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]
_QUEUE_POLL_S = 0.1  # how often a blocked producer re-checks the stop flag


@dataclass
class PipelineRun:
    """Tile embeddings of one slide and what the pipeline spent on them.

    Attributes:
        embeddings: (N, D) float32, kept tiles in grid order.
        level0_xy: (N, 2) int64 top-left of each tile in level-0 pixels.
        grid_index: (N,) int64 index of each tile in the grid.
        model_s: seconds the caller thread spent in the encoder.
        wait_s: seconds the caller thread waited for tiles (the model was idle).
        produce_s: seconds the producer thread spent reading and preprocessing (overlapped).
        batches: model calls.
    """

    embeddings: np.ndarray
    level0_xy: np.ndarray
    grid_index: np.ndarray
    model_s: float = 0.0
    wait_s: float = 0.0
    produce_s: float = 0.0
    batches: int = 0


@dataclass
class _Failure:
    exc: BaseException


_DONE = object()
_MAX_NICE = 19  # Linux's lowest priority


def thread_niceness() -> int | None:
    """The calling thread's niceness (Linux: per thread), or None where it cannot be read."""
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except (AttributeError, OSError):  # no getpriority (Windows) or no such thread id
        return None


def lower_thread_priority(increment: int) -> bool:
    """Run the calling thread ``increment`` steps nicer than the process (at most 19).

    On Linux ``setpriority(PRIO_PROCESS, tid)`` sets one thread's niceness, and threads started
    afterwards by this thread inherit it. The target is relative to the process's (its main
    thread's) niceness, so calling it again, or from a thread that inherited it, changes nothing.
    Lowering is one-way for an unprivileged process, so only threads that never run the model
    call this (a model call from such a thread goes through ``xmag.inflight.ModelThread``).

    Args:
        increment: niceness to add to the process's; 0 or less does nothing.

    Returns:
        True when the thread's niceness was raised; False when there was nothing to do or the
        platform does not allow it (the thread then keeps its priority).
    """
    if increment <= 0:
        return False
    current = thread_niceness()
    try:
        process = os.getpriority(os.PRIO_PROCESS, os.getpid())
    except (AttributeError, OSError):
        return False
    if current is None:
        return False
    target = min(_MAX_NICE, process + increment)
    if target <= current:
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), target)
    except OSError:  # a sandbox forbidding it: keep the priority, never fail the slide
        return False
    return True


def run_pipeline(
    reader: SlideReader,
    plan: SlidePlan,
    *,
    preprocess: Callable[[np.ndarray], np.ndarray],
    encode: Callable[[np.ndarray], np.ndarray],
    dim: int,
    batch_size: int,
    reader_workers: int,
    queue_depth: int,
    reader_nice: int = 0,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> PipelineRun:
    """Embed every kept tile of ``plan`` read through ``reader``.

    Args:
        preprocess: uint8 RGB tiles (n, t, t, 3) -> model input (runs on the producer thread).
        encode: model input -> (n, dim) float32 embeddings (runs on the caller's thread).
        batch_size: tiles per batch read and encoded.
        reader_workers: threads decoding tiles; queue_depth: batches in flight between them.
        reader_nice: niceness added to the producer and reader threads (``TileFeed``).

    Raises:
        JobCanceledError: ``should_cancel()`` returned True between two batches.
        RegionReadError and other XmagError: from the reads, re-raised in this thread.
    """
    with TileFeed(
        reader,
        plan,
        preprocess=preprocess,
        batch_size=batch_size,
        reader_workers=reader_workers,
        queue_depth=queue_depth,
        reader_nice=reader_nice,
    ) as feed:
        return feed.run(encode, dim, progress=progress, should_cancel=should_cancel)


class TileFeed:
    """The producer half of the pipeline, started ahead of the model.

    Starting it reads and preprocesses up to ``queue_depth`` batches (then blocks), so a slide
    waiting for the model (``xmag.inflight``) has its first batches ready when its turn comes.
    ``run`` is the consumer half; ``close`` (or leaving the ``with``) stops the producer and
    joins it, whether or not ``run`` was called. The producer and its reader threads run
    ``reader_nice`` steps nicer than the process (see the module docstring).
    """

    def __init__(
        self,
        reader: SlideReader,
        plan: SlidePlan,
        *,
        preprocess: Callable[[np.ndarray], np.ndarray],
        batch_size: int,
        reader_workers: int,
        queue_depth: int,
        reader_nice: int = 0,
    ) -> None:
        self.reader = reader
        self.indices = plan.grid.kept_indices()
        self.total = int(self.indices.shape[0])
        self.produce_s = 0.0
        self._q: queue.Queue[Any] = queue.Queue(maxsize=queue_depth)
        self._stop = threading.Event()
        self._producer = threading.Thread(
            target=self._produce,
            args=(plan, preprocess, batch_size, reader_workers, queue_depth, reader_nice),
            name="xmag-engine-producer",
            daemon=True,
        )
        self._producer.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=_QUEUE_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(
        self,
        plan: SlidePlan,
        preprocess: Callable[[np.ndarray], np.ndarray],
        batch_size: int,
        reader_workers: int,
        queue_depth: int,
        reader_nice: int,
    ) -> None:
        # Before the reader pool exists: its threads inherit this thread's niceness.
        lower_thread_priority(reader_nice)
        t0 = time.perf_counter()
        batches = None
        try:
            batches = iter_tile_batches(
                self.reader,
                plan.grid,
                plan.level,
                indices=self.indices,
                batch_size=batch_size,
                workers=reader_workers,
                max_pending=queue_depth,
            )
            for b in batches:
                item = (b.indices, b.level0_xy, preprocess(b.pixels))
                if not self._put(item):
                    return
            self.produce_s = time.perf_counter() - t0
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer's thread, re-raised there
            self._put(_Failure(exc))
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # joins the reader threads, also when stopped early

    def run(
        self,
        encode: Callable[[np.ndarray], np.ndarray],
        dim: int,
        *,
        progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
    ) -> PipelineRun:
        """Encode every batch the producer hands over, on the caller's thread (once)."""
        total = self.total
        run = PipelineRun(
            np.empty((total, dim), np.float32),
            np.empty((total, 2), np.int64),
            np.empty((total,), np.int64),
        )
        done = 0
        if progress is not None:
            progress(0, total)
        while True:
            if should_cancel is not None and should_cancel():
                raise JobCanceledError(
                    f"Embedding {self.reader.path} was canceled after {done} of {total} tiles.",
                    path=self.reader.path,
                    tiles_done=done,
                    tiles_total=total,
                )
            t0 = time.perf_counter()
            item = self._q.get()
            t1 = time.perf_counter()
            run.wait_s += t1 - t0
            if item is _DONE:
                break
            if isinstance(item, _Failure):
                raise item.exc
            idx, xy, x = item
            emb = encode(x)
            run.model_s += time.perf_counter() - t1
            n = idx.shape[0]
            run.embeddings[done : done + n] = emb
            run.level0_xy[done : done + n] = xy
            run.grid_index[done : done + n] = idx
            done += n
            run.batches += 1
            if progress is not None:
                progress(done, total)
        if done != total:
            raise XmagUsageError(f"pipeline produced {done} tiles, expected {total}")
        run.produce_s = self.produce_s
        return run

    def close(self) -> None:
        """Stop the producer and join it (idempotent)."""
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:  # unblock a producer waiting on a full queue
                self._q.get_nowait()
        self._producer.join()

    def __enter__(self) -> TileFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
