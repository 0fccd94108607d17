"""Several slides in flight, one on the model: the per-slide fixed costs off its critical path.

At 60 slides/min a worker has one second per slide, yet opening, hashing (the result key needs
the slide's sha256) and planning (thumbnail, tissue, grid) all run before a slide's first tile
reaches the model. One slide at a time, the accelerator idles through them. With slides in flight
they run for the next slides while the model works on the current one::

    thread 1   prepare A | model A (reads + encoder) | heads, write A | prepare C | wait ...
    thread 2   prepare B | wait ...................... | model B .................... | heads...
    model                  [ A ...................... ][ B ........................ ][ C ...

(prepare = open, hash, plan.)

The design, the simplest we found that keeps every per-slide guarantee:

* **N threads, each carrying one slide from start to finish**, N = ``XMAG_SLIDES_IN_FLIGHT``
  (``SlidesInFlightSettings``; default ``DEFAULT_SLIDES_IN_FLIGHT`` = 2, on a GPU and on the CPU
  alike: see ``SlidesInFlightSettings`` for what was measured). A slide's result,
  progress, cancel check and error belong to its own thread's call of
  ``Engine.embed_slide`` (or ``xmag.store.lookup_or_embed``), exactly as one slide at a time:
  a failing slide raises in its own thread and never touches its neighbours.
* **One model gate in the engine** (``ModelGate``, held by ``Engine.finish_slide`` around the
  encoding loop): one slide at a time on the model, in the order slides became ready (FIFO), so
  the model is never shared between two slides. Just before it queues at the gate a slide starts
  its tile reads (``xmag.pipeline.TileFeed``), which stop after ``queue_depth`` batches until
  its turn: its first batches are ready when the model frees up. A slide waiting at the gate keeps
  checking its own ``should_cancel`` and leaves with ``JobCanceledError`` when asked. Heads and
  file writes run after the gate, overlapping the next slide's model.
* **Bounds.** At most N slides are held at once: the one on the model (``queue_depth`` batches
  plus its [n_tiles, D] embeddings), and N - 1 being opened and planned (a reader handle, its
  thumbnail-sized tissue mask and grid), waiting at the gate (the same plus at most
  ``queue_depth`` read-ahead batches: 4 x 32 x 3 x 224 x 224 float32 = 77 MB by default) or
  writing results. N = 1 is the old behaviour, run on the caller's thread.

* **Priorities on a shared CPU** (``XMAG_READER_NICE``, 0 turns them off). The threads
  carrying slides run that many steps nicer than the process (``map_in_flight``'s threads
  from their start; a service worker's Dramatiq threads when a job starts), so the next
  slide's open, hash, plan, reads, heads and writes take the cores only when the model leaves
  them. The model itself never runs nicer: the
  engine's ``ModelThread``, started at the engine's priority, runs each encoder call made from a
  nicer thread (ORT's calling thread does part of the work), and calls from a thread at the
  engine's priority run in place, as before. Heartbeat and lease threads are never lowered.

Callers: ``xmag embed`` over many slides maps its per-slide function with ``map_in_flight``; the
service worker (``service.worker``) runs N Dramatiq worker threads with a prefetch of N, each
message claimed by the state middleware before its actor runs (claim, lease renewed by the
heartbeat for every job the worker holds, exactly-once finish): a job being prepared or waiting
at the gate is an ordinary claimed, leased job, so a crash mid-prepare loses nothing (the message
is redelivered and the lease runs out, as for a crash mid-model).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from xmag.pipeline import lower_thread_priority, thread_niceness
from xmag.settings import EngineSettings, register_settings

__all__ = [
    "DEFAULT_SLIDES_IN_FLIGHT",
    "MAX_SLIDES_IN_FLIGHT",
    "ModelGate",
    "ModelThread",
    "SlidesInFlightSettings",
    "map_in_flight",
]

#: Slides held at once by one worker or ``xmag embed``: one on the model, one being prepared.
DEFAULT_SLIDES_IN_FLIGHT = 2
#: More slides in flight than this only holds memory: preparing is much shorter than the model.
MAX_SLIDES_IN_FLIGHT = 8
#: How often (s) a slide waiting for the model re-checks its cancel flag.
GATE_POLL_S = 0.1

_T = TypeVar("_T")
_R = TypeVar("_R")


@register_settings
class SlidesInFlightSettings(BaseSettings):
    """How many slides one process keeps in flight (``XMAG_SLIDES_IN_FLIGHT``).

    The default is 2 on a GPU and on the CPU. On a GPU the model's work leaves the host's cores
    to the next slide. On the CPU the encoder's threads and the next slide's hashing, planning
    and decoding share the cores, so it was measured (2 cores, 20 generated 40x slides of
    50,000 px, the demo package's int8 encoder, ``benchmarks/bench_inflight.py``, quiet machine):
    1 -> 2 in flight took ``xmag embed`` from 27.1 to 31.9 slides/min and one service worker
    from 23.9 to 30.9 (model busy 0.66 -> 0.82 and 0.57 -> 0.77 of the wall time), each slide's
    model time growing 5% with the other slide's threads at ``XMAG_READER_NICE``; peak RSS
    +120 MB (CLI) and +50 MB (worker). ``XMAG_SLIDES_IN_FLIGHT=1`` gives the lowest latency for a
    lone slide on a busy CPU.
    """

    model_config = SettingsConfigDict(env_prefix="XMAG_", extra="ignore")

    slides_in_flight: int = Field(
        default=DEFAULT_SLIDES_IN_FLIGHT,
        ge=1,
        le=MAX_SLIDES_IN_FLIGHT,
        description="slides opened, hashed and planned while the model runs another (1: one "
        "slide at a time)",
    )


class ModelGate:
    """One holder at a time, admitted in the order they asked (FIFO), cancelable while waiting.

    ``threading.Lock`` promises no order; a slide that became ready first goes on the model first.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._held = False

    @property
    def waiting(self) -> int:
        """Holders waiting now (not counting the one holding the gate)."""
        with self._cond:
            return len(self._waiting)

    @contextlib.contextmanager
    def hold(self, should_cancel: Callable[[], bool] | None = None) -> Iterator[bool]:
        """Wait for the gate and hold it for the ``with`` body.

        Yields:
            True once held; False, without holding it, when ``should_cancel()`` returned True
            while waiting (the caller raises its own cancellation error).
        """
        ticket = object()
        with self._cond:
            self._waiting.append(ticket)
        admitted = False
        try:
            while not admitted:
                with self._cond:
                    if not self._held and self._waiting[0] is ticket:
                        self._held = admitted = True
                        break
                    self._cond.wait(GATE_POLL_S if should_cancel is not None else None)
                # Outside the lock: a cancel check may ask Redis.
                if should_cancel is not None and should_cancel():
                    break
        finally:
            with self._cond:
                self._waiting.remove(ticket)
                self._cond.notify_all()  # the next ticket may be at the front now
        if not admitted:
            yield False
            return
        try:
            yield True
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()


class ModelThread:
    """Runs model calls at the priority of the thread that built it (the engine's).

    A thread that lowered its own priority (``xmag.pipeline.lower_thread_priority``: a slide
    thread preparing the next slide, a service job thread) cannot raise it again without
    privileges, yet ONNX Runtime does part of each call's work on the calling thread. Such callers
    hand the call to this thread and wait; callers at this thread's priority or higher run the
    call in place, so one slide at a time behaves exactly as without it.
    """

    def __init__(self) -> None:
        self.niceness = thread_niceness()
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=_serve_calls, args=(self._calls,), name="xmag-model", daemon=True
        )
        self._thread.start()  # now: a thread inherits its creator's niceness when it starts
        # The thread holds the queue, not this object: when the engine goes, the thread ends.
        weakref.finalize(self, self._calls.put, None)

    def call(self, fn: Callable[..., _R], *args: Any) -> _R:
        """``fn(*args)``, on this thread when the caller runs nicer than it, else in place."""
        mine = thread_niceness()
        if self.niceness is None or mine is None or mine <= self.niceness:
            return fn(*args)
        done: Future[_R] = Future()
        self._calls.put((done, fn, args))
        return done.result()


def _serve_calls(calls: queue.SimpleQueue[Any]) -> None:
    while (item := calls.get()) is not None:
        done, fn, args = item
        if not done.set_running_or_notify_cancel():
            continue
        try:
            done.set_result(fn(*args))
        except BaseException as exc:  # re-raised in the caller's thread
            done.set_exception(exc)


def map_in_flight(
    fn: Callable[[_T], _R],
    items: Sequence[_T],
    slides_in_flight: int,
    *,
    stop: threading.Event | None = None,
    nice: int | None = None,
) -> list[_R]:
    """``[fn(item) for item in items]`` with up to ``slides_in_flight`` calls running at once.

    Results come back in ``items`` order. ``fn`` handles its item's own errors; an exception it
    lets out (or Ctrl-C here) sets ``stop`` (pass ``stop.is_set`` as the slides' cancel check),
    drops the items not started yet and is re-raised once the running calls have returned. With
    ``slides_in_flight`` 1 the calls run one after another on this thread.

    Args:
        nice: niceness the slide threads add to their own when they start (default: the
            engine settings' ``reader_nice``, ``XMAG_READER_NICE``); the model's calls go back
            to the engine's priority (``ModelThread``).
    """
    if slides_in_flight <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    increment = EngineSettings().reader_nice if nice is None else nice
    with ThreadPoolExecutor(
        slides_in_flight,
        thread_name_prefix="xmag-slide",
        initializer=lower_thread_priority,
        initargs=(increment,),
    ) as pool:
        futures: list[Future[_R]] = [pool.submit(fn, item) for item in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            if stop is not None:
                stop.set()
            for f in futures:
                f.cancel()  # those not started yet
            raise
