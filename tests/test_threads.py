"""Thread pools that do not fight the model: CPU counts, reader priorities, the model thread.

On a CPU the encoder's threads and the readers share cores; readers and planners run nicer than
the model (``XMAG_READER_NICE``), the model never does, and results do not depend on it.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from xmag import settings as settings_module
from xmag.engine import Engine
from xmag.inflight import ModelThread, map_in_flight
from xmag.pipeline import lower_thread_priority, run_pipeline, thread_niceness
from xmag.plan import plan_slide
from xmag.preprocess import Preprocessor
from xmag.readers import open_slide
from xmag.settings import EngineSettings, available_cpus

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread niceness is a Linux behaviour"
)

CMU = "CMU-1-Small-Region.svs"


def _process_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, os.getpid())


def _in_thread(fn):  # type: ignore[no-untyped-def]
    """``fn()`` on a fresh thread (so lowering its priority leaves the test's thread alone)."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised below
            box["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]


def _engine(package: Path, nice: int) -> Engine:
    s = EngineSettings(providers=["cpu"], batch_size=2, reader_workers=2, reader_nice=nice)  # type: ignore[call-arg]
    return Engine.from_dir(package, s)


def test_cpu_count_follows_the_cgroup_quota_below_the_affinity_mask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(settings_module, "_CGROUP_CPU_MAX", cpu_max)
    cpu_max.write_text("max 100000\n")
    assert available_cpus() == len(os.sched_getaffinity(0))
    cpu_max.write_text("50000 100000\n")  # half a CPU: one thread, never zero
    assert available_cpus() == 1
    assert EngineSettings().intra_op_threads == 1
    assert EngineSettings().reader_workers <= 2


def test_a_lowered_thread_runs_nicer_than_the_process_and_others_keep_theirs() -> None:
    base = _process_nice()

    def lower_twice() -> tuple[bool, int | None, bool, int | None]:
        first = lower_thread_priority(5)
        after_first = thread_niceness()
        second = lower_thread_priority(5)  # relative to the process: no compounding
        return first, after_first, second, thread_niceness()

    first, after_first, second, after_second = _in_thread(lower_twice)
    assert (first, after_first) == (base < 19, min(19, base + 5))
    assert (second, after_second) == (False, min(19, base + 5))
    assert thread_niceness() == base
    assert lower_thread_priority(0) is False


def test_reader_threads_run_nicer_and_the_model_caller_does_not(
    default_package: Path, slides_dir: Path
) -> None:
    engine = _engine(default_package, nice=0)
    base = thread_niceness()
    seen: dict[str, set[int | None]] = {"producer": set(), "readers": set(), "model": set()}

    def preprocess(pixels: np.ndarray) -> np.ndarray:  # runs on the producer thread
        seen["producer"].add(thread_niceness())
        for t in threading.enumerate():
            if t.name.startswith("xmag-tiles") and t.native_id is not None:
                seen["readers"].add(os.getpriority(os.PRIO_PROCESS, t.native_id))
        return engine.preprocess(pixels)

    def encode(x: np.ndarray) -> np.ndarray:  # runs on the caller's thread
        seen["model"].add(thread_niceness())
        return engine.encode(x)

    with open_slide(slides_dir / CMU) as reader:
        plan = plan_slide(reader, engine.package.card.tiling_params())
        run = run_pipeline(
            reader, plan, preprocess=preprocess, encode=encode,
            dim=engine.package.card.outputs.embedding.dim, batch_size=1, reader_workers=2,
            queue_depth=2, reader_nice=7,
        )  # fmt: skip
    assert run.embeddings.shape[0] == plan.grid.n_kept
    assert seen["producer"] == {min(19, _process_nice() + 7)}
    assert seen["readers"] == {min(19, _process_nice() + 7)}
    assert seen["model"] == {base}
    assert thread_niceness() == base


def test_embeddings_are_identical_with_and_without_nicer_readers(
    default_package: Path, slides_dir: Path
) -> None:
    runs = []
    for nice in (0, 10):
        engine = _engine(default_package, nice)
        with open_slide(slides_dir / CMU) as reader:
            plan = plan_slide(reader, engine.package.card.tiling_params())
            runs.append(engine.run_pipeline(reader, plan))
    assert np.array_equal(runs[0].embeddings, runs[1].embeddings)
    assert np.array_equal(runs[0].grid_index, runs[1].grid_index)


def test_model_calls_from_a_nicer_thread_run_at_the_engines_priority() -> None:
    model = ModelThread()  # built here: this thread's priority
    base = thread_niceness()
    here = threading.get_native_id()
    # From a thread at its priority: in place, on the caller's own thread.
    assert model.call(threading.get_native_id) == here

    def from_nicer_thread() -> tuple[int | None, int | None, int]:
        lower_thread_priority(6)
        return thread_niceness(), model.call(thread_niceness), model.call(threading.get_native_id)

    caller, ran_at, ran_on = _in_thread(from_nicer_thread)
    assert caller == min(19, _process_nice() + 6)
    assert ran_at == base
    assert ran_on != here

    def fails() -> None:
        lower_thread_priority(6)
        model.call(int, "not a number")

    with pytest.raises(ValueError):
        _in_thread(fails)  # the model thread's error comes back to the caller


def test_slides_in_flight_threads_run_nicer_and_their_encoder_calls_do_not(
    default_package: Path,
) -> None:
    engine = _engine(default_package, nice=0)
    base = thread_niceness()
    calls: list[int | None] = []
    encoder_run = engine.encoder.run

    def watched_run(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(thread_niceness())
        return encoder_run(*args, **kwargs)

    engine.encoder.run = watched_run  # type: ignore[method-assign]
    x = engine.preprocess(np.full((2, 224, 224, 3), 200, np.uint8))

    def one(_: int) -> int | None:
        engine.encode(x)
        return thread_niceness()

    slide_threads = map_in_flight(one, [0, 1, 2], 2, nice=4)
    assert set(slide_threads) == {min(19, _process_nice() + 4)}
    assert calls and set(calls) == {base}


def test_preprocessing_tile_by_tile_matches_the_formula() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 17, 13, 3), dtype=np.uint8)
    for order in ("RGB", "BGR"):
        pre = Preprocessor(channel_order=order)
        src = [2, 1, 0] if order == "BGR" else [0, 1, 2]
        mean = np.asarray(pre.mean)[:, None, None]
        std = np.asarray(pre.std)[:, None, None]
        want = (pixels[..., src].transpose(0, 3, 1, 2) / 255.0 - mean) / std
        got = pre(pixels)
        assert got.dtype == np.float32 and got.shape == (3, 3, 17, 13)
        assert np.array_equal(got, want.astype(np.float32))


def test_encoder_sessions_never_spin(default_package: Path) -> None:
    engine = _engine(default_package, nice=0)
    options = engine.encoder._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_the_model_thread_ends_with_its_owner() -> None:
    import gc

    model = ModelThread()
    thread = model._thread
    assert thread.is_alive()
    del model
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
