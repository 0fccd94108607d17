"""The REST API over real HTTP on a real Redis (no worker needed): auth, uploads, references,
idempotency, cancel, listing, problem+json errors (the schemathesis run is in
test_openapi_contract.py)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from service.embedded_redis import EmbeddedRedis
from tests.conftest import SLIDES_DIR
from tests.service_helpers import (
    API_KEY,
    READ_KEY,
    client,
    service_env,
    start_api,
)

SVS = SLIDES_DIR / "CMU-1-Small-Region.svs"
CAP = 8 * 1024 * 1024  # XMAG_MAX_UPLOAD_BYTES in service_helpers.FAST_ENV


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    data = tmp_path_factory.mktemp("api")
    with EmbeddedRedis(data / "redis") as redis_server:
        env = service_env(
            redis_server.url, data, data / "no-model", XMAG_SLIDE_ROOTS=str(SLIDES_DIR)
        )
        api, base = start_api(env, data / "api.log")
        try:
            yield base, data
        finally:
            api.stop()


@pytest.fixture
def http(stack: tuple[str, Path]) -> Iterator[httpx.Client]:
    with client(stack[0]) as c:
        yield c


def _incoming(data: Path) -> list[Path]:
    return list((data / "slides" / ".incoming").glob("*"))


def _problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == code


def test_health_endpoints_are_open_and_readyz_says_no_worker(stack: tuple[str, Path]) -> None:
    with client(stack[0], key=None) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        ready = anonymous.get("/readyz")
        assert ready.status_code == 503 and ready.json()["redis"] is True
        assert anonymous.get("/openapi.json").json()["paths"]["/v1/jobs"]


def test_a_missing_or_unknown_key_gets_401_and_a_read_key_cannot_submit(
    stack: tuple[str, Path],
) -> None:
    with client(stack[0], key=None) as anonymous:
        _problem(anonymous.get("/v1/jobs"), 401, "UNAUTHENTICATED")
    with client(stack[0], key="x" * 40) as wrong:
        _problem(wrong.get("/v1/jobs"), 401, "UNAUTHENTICATED")
    with client(stack[0], key=READ_KEY) as reader:
        assert reader.get("/v1/jobs").status_code == 200
        assert reader.get("/metrics").status_code == 200
        _problem(reader.post("/v1/jobs", json={"path": SVS.name}), 403, "FORBIDDEN")
        _problem(reader.put("/v1/slides", content=b"abc"), 403, "FORBIDDEN")


def test_the_x_api_key_header_is_accepted(stack: tuple[str, Path]) -> None:
    response = httpx.get(f"{stack[0]}/v1/models", headers={"X-API-Key": API_KEY})
    assert response.status_code == 200


def test_an_upload_is_stored_under_its_sha256_and_a_second_copy_is_deduplicated(
    http: httpx.Client, stack: tuple[str, Path]
) -> None:
    body = SVS.read_bytes()
    digest = hashlib.sha256(body).hexdigest()
    first = http.put(
        "/v1/slides", params={"filename": "PATIENT-NAME.svs"}, content=body,
        headers={"X-Content-SHA256": digest},
    )  # fmt: skip
    assert first.status_code in (200, 201), first.text
    assert first.json()["slide_id"] == digest
    stored = stack[1] / "slides" / digest[:2] / f"{digest}.svs"
    assert stored.read_bytes() == body
    again = http.put("/v1/slides", params={"filename": "x.svs"}, content=body)
    assert again.status_code == 200 and again.json()["deduplicated"] is True
    assert http.get(f"/v1/slides/{digest}").json()["size_bytes"] == len(body)
    assert not _incoming(stack[1])


def test_a_multipart_upload_streams_the_file_part(
    http: httpx.Client, stack: tuple[str, Path]
) -> None:
    body = (SLIDES_DIR / "OS-1-detail.ome.tif").read_bytes()
    response = http.post(
        "/v1/slides", files={"file": ("scan.ome.tif", body, "image/tiff")}, data={"note": "n"}
    )
    assert response.status_code in (200, 201), response.text
    digest = hashlib.sha256(body).hexdigest()
    assert response.json()["slide_id"] == digest
    assert (stack[1] / "slides" / digest[:2] / f"{digest}.ome.tif").is_file()


def test_a_wrong_checksum_is_refused_and_leaves_no_file(
    http: httpx.Client, stack: tuple[str, Path]
) -> None:
    body = b"II*\x00" + b"\x01" * 5000
    response = http.put("/v1/slides", content=body, headers={"X-Content-SHA256": "0" * 64})
    _problem(response, 422, "UPLOAD_CHECKSUM_MISMATCH")
    assert not (stack[1] / "slides" / hashlib.sha256(body).hexdigest()[:2]).exists()
    assert not _incoming(stack[1])


def test_an_empty_upload_is_refused(http: httpx.Client) -> None:
    _problem(http.put("/v1/slides", content=b""), 422, "EMPTY_UPLOAD")


def test_an_oversized_upload_gets_413_from_its_length_header(http: httpx.Client) -> None:
    response = http.put("/v1/slides", content=b"\0" * (CAP + 1))  # httpx sends Content-Length
    _problem(response, 413, "UPLOAD_TOO_LARGE")


def test_an_oversized_chunked_upload_gets_413_while_streaming_and_leaves_no_file(
    http: httpx.Client, stack: tuple[str, Path]
) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: only the streaming check can stop it
        for _ in range(CAP // 65536 + 2):
            yield b"\1" * 65536

    try:
        response = http.put("/v1/slides", content=chunks())
    except httpx.HTTPError:  # the server may close the connection before the client stops sending
        response = None
    if response is not None:
        _problem(response, 413, "UPLOAD_TOO_LARGE")
    assert not _incoming(stack[1])


def test_malformed_json_and_schema_violations_are_422_invalid_request(http: httpx.Client) -> None:
    bad_json = http.post(
        "/v1/jobs", content=b'{"path": ', headers={"content-type": "application/json"}
    )
    _problem(bad_json, 422, "INVALID_REQUEST")
    _problem(http.post("/v1/jobs", json={}), 422, "INVALID_REQUEST")
    both = {"path": SVS.name, "slide_id": "a" * 64}
    _problem(http.post("/v1/jobs", json=both), 422, "INVALID_REQUEST")
    _problem(http.post("/v1/jobs", json={"path": SVS.name, "extra": 1}), 422, "INVALID_REQUEST")


def test_a_callback_url_that_is_not_http_or_https_is_refused(http: httpx.Client) -> None:
    body = {"path": SVS.name, "callback_url": "file:///etc/passwd"}
    _problem(http.post("/v1/jobs", json=body), 422, "INVALID_REQUEST")
    batch = {"jobs": [{"path": SVS.name}], "callback_url": "ftp://lis.example.org/x"}
    _problem(http.post("/v1/batches", json=batch), 422, "INVALID_REQUEST")


def test_a_callback_to_a_cloud_metadata_address_is_refused_for_jobs_and_batches(
    http: httpx.Client,
) -> None:
    body = {"path": SVS.name, "callback_url": "http://169.254.169.254/latest/meta-data/"}
    _problem(http.post("/v1/jobs", json=body), 422, "CALLBACK_REFUSED")
    batch = {"jobs": [{"path": SVS.name}], "callback_url": "http://metadata.google.internal/x"}
    _problem(http.post("/v1/batches", json=batch), 422, "CALLBACK_REFUSED")


@pytest.mark.parametrize(
    ("reference", "code"),
    [
        ("../../pyproject.toml", "SLIDE_REFERENCE_REFUSED"),
        ("/etc/passwd", "SLIDE_REFERENCE_REFUSED"),
        ("https://example.org/slide.svs", "SLIDE_REFERENCE_REFUSED"),
        ("missing.svs", "SLIDE_NOT_FOUND"),
    ],
)
def test_bad_references_are_refused_at_submission(
    http: httpx.Client, reference: str, code: str
) -> None:
    _problem(http.post("/v1/jobs", json={"path": reference}), 422, code)


def test_an_unknown_upload_id_is_slide_not_found(http: httpx.Client) -> None:
    _problem(http.post("/v1/jobs", json={"slide_id": "f" * 64}), 422, "SLIDE_NOT_FOUND")


def test_a_job_by_reference_is_accepted_with_202_and_a_location(http: httpx.Client) -> None:
    response = http.post("/v1/jobs", json={"path": SVS.name, "priority": "high"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"].endswith(f"/v1/jobs/{job['id']}")
    assert job["state"] == "queued" and job["priority"] == "high"
    assert http.get(response.headers["location"]).json()["id"] == job["id"]


def test_the_same_idempotency_key_and_body_return_the_same_job(http: httpx.Client) -> None:
    body = {"path": SVS.name, "options": {"tissue_threshold": 0.3}}
    headers = {"Idempotency-Key": "order-17-slide-1"}
    first = http.post("/v1/jobs", json=body, headers=headers)
    second = http.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.headers["idempotent-replayed"] == "true"
    other = http.post("/v1/jobs", json={**body, "priority": "low"}, headers=headers)
    _problem(other, 422, "IDEMPOTENCY_KEY_REUSED")


def test_the_same_idempotency_key_returns_the_same_batch(http: httpx.Client) -> None:
    body = {"jobs": [{"path": SVS.name}, {"path": "OS-1-detail.ome.tif"}]}
    headers = {"Idempotency-Key": "batch-42"}
    first = http.post("/v1/batches", json=body, headers=headers)
    second = http.post("/v1/batches", json=body, headers=headers)
    assert first.status_code == second.status_code == 202, first.text
    assert first.json()["id"] == second.json()["id"]
    assert [j["id"] for j in first.json()["jobs"]] == [j["id"] for j in second.json()["jobs"]]
    _problem(http.post("/v1/batches", json={"jobs": body["jobs"][:1]}, headers=headers), 422,
             "IDEMPOTENCY_KEY_REUSED")  # fmt: skip


def _job_count(http: httpx.Client) -> int:
    return len(http.get("/v1/jobs", params={"limit": 1000}).json()["items"])


def test_concurrent_retries_of_one_batch_get_the_same_batch_and_leave_no_orphan_jobs(
    http: httpx.Client, stack: tuple[str, Path]
) -> None:
    body = {"jobs": [{"path": SVS.name}, {"path": "OS-1-detail.ome.tif"}, {"path": SVS.name}]}
    headers = {"Idempotency-Key": "batch-race-1"}
    before = _job_count(http)
    barrier = threading.Barrier(8)

    def submit(_: int) -> httpx.Response:
        with client(stack[0]) as c:
            barrier.wait()
            return c.post("/v1/batches", json=body, headers=headers)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(submit, range(8)))
    assert {r.status_code for r in responses} == {202}, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len({tuple(j["id"] for j in r.json()["jobs"]) for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 7
    assert _job_count(http) == before + 3


def test_a_batch_with_a_refused_reference_is_refused_whole_and_names_the_index(
    http: httpx.Client,
) -> None:
    body = {"jobs": [{"path": SVS.name}, {"path": "../secret"}]}
    response = http.post("/v1/batches", json=body)
    _problem(response, 422, "SLIDE_REFERENCE_REFUSED")
    assert response.json()["fields"]["job_index"] == 1


def test_a_queued_job_is_canceled_at_once_and_lists_under_its_state(http: httpx.Client) -> None:
    job = http.post("/v1/jobs", json={"path": SVS.name, "priority": "low"}).json()
    canceled = http.post(f"/v1/jobs/{job['id']}/cancel")
    assert canceled.status_code == 200 and canceled.json()["state"] == "canceled"
    assert canceled.json()["cancel"] == "canceled" and canceled.json()["took_effect"] is True
    assert canceled.json()["error"]["code"] == "JOB_CANCELED"
    again = http.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert again["cancel"] == "already_canceled" and again["took_effect"] is False
    listed = http.get("/v1/jobs", params={"state": "canceled"}).json()["items"]
    assert job["id"] in [j["id"] for j in listed]
    _problem(http.get(f"/v1/jobs/{job['id']}/result"), 409, "JOB_CANCELED")


def test_results_of_unfinished_or_unknown_jobs_are_problems(http: httpx.Client) -> None:
    job = http.post("/v1/jobs", json={"path": SVS.name}).json()
    _problem(http.get(f"/v1/jobs/{job['id']}/result"), 409, "RESULT_NOT_READY")
    _problem(http.get(f"/v1/jobs/{job['id']}/artifacts/passwd"), 404, "NOT_FOUND")
    _problem(http.get("/v1/jobs/job_nope"), 404, "JOB_NOT_FOUND")
    _problem(http.post("/v1/jobs/job_nope/cancel"), 404, "JOB_NOT_FOUND")
    _problem(http.get("/v1/batches/batch_nope"), 404, "NOT_FOUND")


def test_metrics_report_jobs_by_state_and_queue_depth(http: httpx.Client) -> None:
    http.post("/v1/jobs", json={"path": SVS.name})
    text = http.get("/metrics").text
    queued = [ln for ln in text.splitlines() if ln.startswith('xmag_jobs{state="queued"}')]
    assert queued and float(queued[0].split()[-1]) >= 1
    depth = [
        ln for ln in text.splitlines() if ln.startswith('xmag_queue_depth{queue="xmag-slides"}')
    ]
    assert depth and float(depth[0].split()[-1]) >= 1
