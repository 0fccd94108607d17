"""Slides in flight (``xmag.inflight``): the model gate, the engine called from several threads,
``xmag embed`` over many slides, and a service worker holding two claimed jobs at once.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from xmag.cli import build_app
from xmag.engine import Engine, PreparedSlide
from xmag.errors import JobCanceledError
from xmag.inflight import (
    DEFAULT_SLIDES_IN_FLIGHT,
    ModelGate,
    SlidesInFlightSettings,
    map_in_flight,
)
from xmag.outputs import read_features
from xmag.settings import EngineSettings, check_environment

CMU = "CMU-1-Small-Region.svs"  # 3 tiles at 5x
OME_IHC = "OS-2-ndpi.ome.tif"  # 1 tile at 5x
TCGA = "tcga-cr-7395-01a-01-ts1.svs"  # no mpp: UNKNOWN_MPP


def _engine(package: Path) -> Engine:
    settings = EngineSettings(providers=["cpu"], batch_size=1, reader_workers=1)  # type: ignore[call-arg]
    return Engine.from_dir(package, settings)


@pytest.fixture
def engine(default_package: Path) -> Engine:
    return _engine(default_package)


class _ModelWatch:
    """Wraps ``engine.encode``: how many slides were on the model at once, and when it ran."""

    def __init__(self, engine: Engine, delay_s: float = 0.0) -> None:
        self.inside = 0
        self.most_inside = 0
        self.spans: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        self._encode = engine.encode
        self.delay_s = delay_s
        engine.encode = self  # type: ignore[method-assign]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        t0 = time.monotonic()
        try:
            time.sleep(self.delay_s)  # a slow accelerator
            return self._encode(batch)
        finally:
            with self._lock:
                self.inside -= 1
                self.spans.append((t0, time.monotonic()))


# -- the gate and the map ------------------------------------------------------------------------


def test_the_model_gate_admits_one_holder_at_a_time_first_come_first_served() -> None:
    gate = ModelGate()
    order: list[int] = []
    inside = [0, 0]  # now, most
    lock = threading.Lock()

    def hold(i: int) -> None:
        with gate.hold() as admitted:
            assert admitted
            with lock:
                inside[0] += 1
                inside[1] = max(inside)
            order.append(i)
            time.sleep(0.02)
            with lock:
                inside[0] -= 1

    with gate.hold():  # everyone queues behind this holder, in the order they arrive
        threads = []
        for i in range(5):
            threads.append(threading.Thread(target=hold, args=(i,)))
            threads[-1].start()
            deadline = time.monotonic() + 5
            while gate.waiting < i + 1:
                assert time.monotonic() < deadline
                time.sleep(0.005)
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2, 3, 4]
    assert inside[1] == 1


def test_a_holder_canceled_while_waiting_leaves_the_queue_and_the_next_one_gets_in() -> None:
    gate = ModelGate()
    cancel = threading.Event()
    got: dict[str, bool] = {}

    def wait(name: str, should_cancel: Callable[[], bool] | None) -> None:
        with gate.hold(should_cancel) as admitted:
            got[name] = admitted

    with gate.hold():
        canceled = threading.Thread(target=wait, args=("canceled", cancel.is_set))
        canceled.start()
        while gate.waiting < 1:
            time.sleep(0.005)
        patient = threading.Thread(target=wait, args=("patient", None))
        patient.start()
        while gate.waiting < 2:
            time.sleep(0.005)
        cancel.set()
        canceled.join(5)  # leaves while the gate is still held
        assert got == {"canceled": False}
    patient.join(5)
    assert got == {"canceled": False, "patient": True}
    with gate.hold() as admitted:  # the gate is free again
        assert admitted


def test_map_in_flight_keeps_the_order_and_bounds_the_calls_running_at_once() -> None:
    running = [0, 0]
    lock = threading.Lock()

    def slow_square(x: int) -> int:
        with lock:
            running[0] += 1
            running[1] = max(running)
        time.sleep(0.01 * (5 - x))  # later items finish first
        with lock:
            running[0] -= 1
        return x * x

    assert map_in_flight(slow_square, [0, 1, 2, 3, 4], 2) == [0, 1, 4, 9, 16]
    assert running[1] == 2
    assert map_in_flight(slow_square, [0, 1, 2], 1) == [0, 1, 4]


def test_an_error_escaping_a_slide_sets_stop_and_skips_the_slides_not_started() -> None:
    started: list[int] = []
    stop = threading.Event()

    def fn(x: int) -> int:
        started.append(x)
        if x == 0:
            raise KeyboardInterrupt
        stop.wait(5)
        return x

    with pytest.raises(KeyboardInterrupt):
        map_in_flight(fn, list(range(10)), 2, stop=stop)
    assert stop.is_set()
    assert len(started) < 10


def test_slides_in_flight_is_a_known_bounded_setting_defaulting_to_two(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("XMAG_SLIDES_IN_FLIGHT", raising=False)
    assert SlidesInFlightSettings().slides_in_flight == DEFAULT_SLIDES_IN_FLIGHT == 2
    monkeypatch.setenv("XMAG_SLIDES_IN_FLIGHT", "3")
    assert SlidesInFlightSettings().slides_in_flight == 3
    assert check_environment({"XMAG_SLIDES_IN_FLIGHT": "3", "XMAG_STRICT_SETTINGS": "1"}) == []
    monkeypatch.setenv("XMAG_SLIDES_IN_FLIGHT", "0")
    with pytest.raises(ValueError, match="slides_in_flight"):
        SlidesInFlightSettings()


# -- the engine from several threads -------------------------------------------------------------


def test_slides_in_flight_share_the_model_one_at_a_time_with_results_as_one_at_a_time(
    default_package: Path, slides_dir: Path, tmp_path: Path
) -> None:
    names = [CMU, OME_IHC, CMU]
    alone = _engine(default_package)
    for i, name in enumerate(names):
        alone.embed_slide(slides_dir / name, tmp_path / "alone" / str(i))
    engine = _engine(default_package)
    watch = _ModelWatch(engine, delay_s=0.05)

    def one(i: int) -> object:
        return engine.embed_slide(slides_dir / names[i], tmp_path / "flight" / str(i))

    results = map_in_flight(one, [0, 1, 2], 2)
    assert watch.most_inside == 1  # never two slides' batches on the model at once
    assert [r.slide.name for r in results] == names  # type: ignore[attr-defined]
    for i in range(3):
        a = read_features(tmp_path / "alone" / str(i) / "features.h5")
        b = read_features(tmp_path / "flight" / str(i) / "features.h5")
        arrays = sorted(k for k in a if k != "attrs")
        assert arrays == sorted(k for k in b if k != "attrs") and arrays
        for k in arrays:  # embeddings, coordinates, head outputs
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
        ra = json.loads((tmp_path / "alone" / str(i) / "result.json").read_text())
        rb = json.loads((tmp_path / "flight" / str(i) / "result.json").read_text())
        assert ra["result_key"] == rb["result_key"]
        assert ra["slide_embedding"] == pytest.approx(rb["slide_embedding"], rel=1e-5, abs=1e-6)


def test_the_next_slide_is_opened_hashed_and_planned_while_the_model_runs_the_current_one(
    engine: Engine, slides_dir: Path, tmp_path: Path
) -> None:
    watch = _ModelWatch(engine, delay_s=1.0)  # a slow model: 3 s for CMU's 3 tiles
    prepared_at: dict[str, float] = {}
    prepare = engine.prepare_slide

    def timed_prepare(path: Path, **kw: object) -> PreparedSlide:
        out = prepare(path, **kw)  # type: ignore[arg-type]
        prepared_at[Path(path).name] = time.monotonic()
        return out

    engine.prepare_slide = timed_prepare  # type: ignore[method-assign]
    names = [CMU, CMU, OME_IHC]
    map_in_flight(
        lambda i: engine.embed_slide(slides_dir / names[i], tmp_path / str(i)), [0, 1, 2], 2
    )
    spans = sorted(watch.spans)
    assert len(spans) == 7 and watch.most_inside == 1
    # The third slide's thread became free when the first slide left the model; it opened,
    # hashed and planned the third while the second slide's three batches ran.
    second_slide_end = spans[5][1]
    assert spans[2][1] < prepared_at[OME_IHC] < second_slide_end, (prepared_at, spans)
    assert spans[6][0] >= second_slide_end  # and it went on the model after


def test_a_slide_canceled_while_it_waits_for_the_model_fails_alone_and_writes_nothing(
    engine: Engine, slides_dir: Path, tmp_path: Path
) -> None:
    cancel = threading.Event()
    caught: list[BaseException] = []

    def waiting_slide() -> None:
        try:
            engine.embed_slide(slides_dir / CMU, tmp_path / "canceled", should_cancel=cancel.is_set)
        except BaseException as exc:
            caught.append(exc)

    with engine.model_gate.hold():  # another slide is on the model
        t = threading.Thread(target=waiting_slide)
        t.start()
        deadline = time.monotonic() + 30
        while engine.model_gate.waiting < 1:
            assert time.monotonic() < deadline and t.is_alive(), caught
            time.sleep(0.01)
        cancel.set()
        t.join(10)
        assert not t.is_alive()  # it left before the gate was free
    (exc,) = caught
    assert isinstance(exc, JobCanceledError)
    assert exc.fields["tiles_done"] == 0 and exc.fields["tiles_total"] == 3
    assert "waited for the model" in exc.message
    assert not (tmp_path / "canceled").exists()
    engine.embed_slide(slides_dir / CMU, tmp_path / "next")  # the gate is not wedged
    assert (tmp_path / "next" / "result.json").is_file()


# -- xmag embed ----------------------------------------------------------------------------------


@pytest.mark.parametrize("in_flight", ["1", "3"])
def test_embed_over_many_slides_keeps_argument_order_and_each_slide_s_own_outcome(
    default_package: Path,
    slides_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    in_flight: str,
) -> None:
    monkeypatch.setenv("XMAG_PROVIDERS", "cpu")
    monkeypatch.setenv("XMAG_READER_WORKERS", "1")
    monkeypatch.setenv("XMAG_SLIDES_IN_FLIGHT", in_flight)
    bad = tmp_path / "notes.txt"
    bad.write_text("not a slide\n")
    args = [slides_dir / CMU, bad, slides_dir / TCGA, slides_dir / OME_IHC, slides_dir / CMU]
    argv = ["embed", *map(str, args), "--model", str(default_package), "--no-cache", "--json"]
    res = CliRunner().invoke(build_app(), [*argv, "--out", str(tmp_path / "out")])
    assert res.exit_code == 1, res.output
    outcomes = json.loads(res.stdout)["outcomes"]
    assert [o["slide"] for o in outcomes] == list(map(str, args))
    assert [o["ok"] for o in outcomes] == [True, False, False, True, True]
    assert [o["error"]["code"] for o in outcomes if not o["ok"]] == [
        "UNSUPPORTED_FORMAT",
        "UNKNOWN_MPP",
    ]
    # Folders are named in argument order, whatever order the slides finished in.
    assert [Path(o["out_dir"]).name for o in outcomes if o["ok"]] == [
        "CMU-1-Small-Region",
        "OS-2-ndpi",
        "CMU-1-Small-Region-2",
    ]
    for o in outcomes:
        if o["ok"]:
            assert (Path(o["out_dir"]) / "result.json").is_file()


# -- the service worker --------------------------------------------------------------------------


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    from service.embedded_redis import EmbeddedRedis

    with EmbeddedRedis(tmp_path / "redis") as server:
        yield server.url


def test_a_worker_holds_two_claimed_leased_jobs_and_each_one_s_cancel_still_works(
    default_package: Path,
    slides_dir: Path,
    tmp_path: Path,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service import worker as worker_module
    from service.queue import declare_actors, make_broker, redis_client
    from service.settings import ServiceSettings
    from service.store import JobSpec, JobState, JobStore

    monkeypatch.setenv("XMAG_SLIDES_IN_FLIGHT", "2")
    engine = _engine(default_package)
    release = threading.Event()
    real_encode = engine.encode

    from xmag.pipeline import thread_niceness

    job_nice: list[int | None] = []
    model_nice: list[int | None] = []
    real_run = engine.encoder.run

    def held_encode(batch: np.ndarray) -> np.ndarray:
        job_nice.append(thread_niceness())  # the job thread that hands a batch to the model
        release.wait(30)  # the first slide stays on the model until the test lets it go
        return real_encode(batch)

    def observed_run(*args: Any, **kwargs: Any) -> Any:
        model_nice.append(thread_niceness())  # the thread the encoder itself runs on
        return real_run(*args, **kwargs)

    engine.encode = held_encode  # type: ignore[method-assign]
    engine.encoder.run = observed_run  # type: ignore[method-assign]
    monkeypatch.setattr(worker_module, "load_engine", lambda settings: engine)
    settings = ServiceSettings(
        _env_file=None,
        data_dir=tmp_path / "data",
        model_dir=default_package,
        lease_ms=1500,
        worker_heartbeat_s=0.2,
        worker_idle_timeout_ms=50,
        log_level="WARNING",
    )
    store = JobStore(redis_client(redis_url), settings.namespace)
    broker = make_broker(settings, redis_url)
    actors = declare_actors(broker, settings)
    ids = []
    for name in (CMU, OME_IHC, OME_IHC):
        job_id = store.create_job(JobSpec("path", str(slides_dir / name))).id
        actors.slides["normal"].send(job_id)
        ids.append(job_id)
    broker.close()
    stop = threading.Event()
    thread = threading.Thread(
        target=worker_module.run_worker, args=(settings, redis_url), kwargs={"stop": stop}
    )
    thread.start()
    try:
        deadline = time.monotonic() + 60

        def states() -> list[JobState]:
            assert time.monotonic() < deadline, store.get_many(ids)
            time.sleep(0.05)
            return [r.state for r in store.get_many(ids)]

        # One job on the model (its progress says how many tiles), one claimed and waiting.
        while sorted(r.tiles_total > 0 for r in store.get_many(ids)[:2]) != [False, True]:
            states()
        on_model, waiting = sorted(range(2), key=lambda i: -store.get_many(ids)[i].tiles_total)
        records = store.get_many(ids)
        assert [r.state for r in records] == [JobState.RUNNING, JobState.RUNNING, JobState.QUEUED]
        # Two in flight, the third not claimed: the worker prefetches no more than it can start.
        assert records[0].lease_owner and records[1].lease_owner == records[0].lease_owner
        # The waiting job's lease is renewed by the heartbeat while the other holds the model.
        lease = records[waiting].lease_until_ms
        while store.get_many(ids)[waiting].lease_until_ms <= lease:
            states()
        store.cancel(ids[waiting])  # the waiting job's own cancel: it leaves the gate's queue
        while states()[waiting] != JobState.CANCELED:
            pass
        assert states()[on_model] is JobState.RUNNING  # its neighbour is undisturbed
        release.set()
        while any(s is not JobState.SUCCEEDED for i, s in enumerate(states()) if i != waiting):
            pass
        records = store.get_many(ids)
        assert [r.completions for r in records] == [int(i != waiting) for i in range(3)]
        error = records[waiting].error
        assert error is not None and error.code == "JOB_CANCELED"
        # Two in flight: the job threads (hash, plan, reads) run nicer than the process, and
        # the encoder runs back at the process's priority (xmag.inflight.ModelThread).
        process_nice = os.getpriority(os.PRIO_PROCESS, os.getpid())
        expected = min(19, process_nice + engine.settings.reader_nice)
        assert engine.settings.reader_nice > 0
        assert job_nice and set(job_nice) == {expected}
        assert model_nice and set(model_nice) == {process_nice}
    finally:
        release.set()
        stop.set()
        thread.join(60)
