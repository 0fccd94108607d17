"""Clients apart, actions audited, traceable results: over real HTTP on a real Redis (no worker).

Two clients (lab-a, lab-b) with keys from XMAG_API_KEYS, an admin, and keys made with the
``xmag keys`` command. A client sees its own jobs, batches, slides and results only (another
client's are 404); every submission, read of a result, cancel, key change and refusal is in the
audit log, which an admin pages over the API.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.audit import REFUSALS_LOGGED_PER_MINUTE
from service.queue import redis_client
from service.schemas import WebhookEvent
from service.store import JobState, JobStore
from service.webhooks import verify
from tests.conftest import SLIDES_DIR
from tests.service_helpers import (
    ROOT,
    WEBHOOK_SECRET,
    WebhookReceiver,
    api_stack,
    client,
)

SVS = SLIDES_DIR / "CMU-1-Small-Region.svs"
KEY_A = "lab-a-submit-key-0123456789abcdef"
KEY_B = "lab-b-submit-key-0123456789abcdef"
KEY_ADMIN = "ops-admin-key-0123456789abcdef012"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    keys = f"{KEY_A}@lab-a,{KEY_B}@lab-b,{KEY_ADMIN}:admin@ops"
    with api_stack(tmp_path_factory.mktemp("tenancy"), keys) as s:
        yield {"base": s.base, "data": s.data, "env": s.env, "redis_url": s.redis_url}


@pytest.fixture
def a(stack: dict[str, Any]) -> Iterator[httpx.Client]:
    with client(stack["base"], KEY_A) as c:
        yield c


@pytest.fixture
def b(stack: dict[str, Any]) -> Iterator[httpx.Client]:
    with client(stack["base"], KEY_B) as c:
        yield c


@pytest.fixture
def admin(stack: dict[str, Any]) -> Iterator[httpx.Client]:
    with client(stack["base"], KEY_ADMIN) as c:
        yield c


def _problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    return body


def _keys(stack: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "keys", *args],
        env=stack["env"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _audit(admin: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    response = admin.get("/v1/audit", params=params)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def _upload(http: httpx.Client, body: bytes, name: str) -> httpx.Response:
    return http.put("/v1/slides", params={"filename": name}, content=body)


def test_another_clients_job_is_404_everywhere_and_the_attempt_is_audited(
    a: httpx.Client, b: httpx.Client, admin: httpx.Client
) -> None:
    job = a.post("/v1/jobs", json={"path": SVS.name, "priority": "low"}).json()
    assert job["client"] == "lab-a"
    for response in (
        b.get(f"/v1/jobs/{job['id']}"),
        b.get(f"/v1/jobs/{job['id']}/result"),
        b.get(f"/v1/jobs/{job['id']}/artifacts/heatmap.png"),
        b.post(f"/v1/jobs/{job['id']}/cancel"),
    ):
        _problem(response, 404, "JOB_NOT_FOUND")
    # The refused cancel changed nothing; the job is not in B's list, and is in the admin's.
    assert a.get(f"/v1/jobs/{job['id']}").json()["state"] == "queued"
    assert job["id"] not in [j["id"] for j in b.get("/v1/jobs").json()["items"]]
    assert job["id"] in [j["id"] for j in admin.get("/v1/jobs").json()["items"]]
    assert admin.get(f"/v1/jobs/{job['id']}").status_code == 200
    refused = _audit(admin, job_id=job["id"], outcome="not_found")
    assert {e["action"] for e in refused} >= {"job.read", "result.read", "job.cancel"}
    assert all(e["client"] == "lab-b" and e["detail"] == "other client" for e in refused)
    assert all(e["source"] == "127.0.0.1" for e in refused)
    submitted = _audit(admin, job_id=job["id"], action="job.submit")
    assert submitted and submitted[0]["client"] == "lab-a" and submitted[0]["status"] == 202


def test_uploads_are_deduplicated_underneath_but_each_client_reaches_only_its_own(
    a: httpx.Client, b: httpx.Client, stack: dict[str, Any]
) -> None:
    body = os.urandom(4096)
    digest = hashlib.sha256(body).hexdigest()
    first = _upload(a, body, "C:\\cases\\S-26-0042 A1.svs")
    assert first.status_code == 201 and first.json()["filename"] == "S-26-0042 A1.svs"
    _problem(b.get(f"/v1/slides/{digest}"), 404, "NOT_FOUND")
    _problem(b.post("/v1/jobs", json={"slide_id": digest}), 422, "SLIDE_NOT_FOUND")
    # B's upload of the same bytes is new *for B* (nothing tells B that A holds them).
    mine = _upload(b, body, "b-copy.svs")
    assert mine.status_code == 201 and mine.json()["deduplicated"] is False
    assert list((stack["data"] / "slides" / digest[:2]).glob(f"{digest}*")) == [
        stack["data"] / "slides" / digest[:2] / f"{digest}.svs"
    ]
    assert a.get(f"/v1/slides/{digest}").json()["filename"] == "S-26-0042 A1.svs"
    assert b.get(f"/v1/slides/{digest}").json()["filename"] == "b-copy.svs"
    again = _upload(a, body, "again.svs")
    assert again.status_code == 200 and again.json()["deduplicated"] is True
    job = b.post("/v1/jobs", json={"slide_id": digest}).json()
    assert job["slide_name"] == "b-copy.svs" and job["slide_sha256"] == digest


def test_another_clients_batch_is_404_and_a_batch_pages_its_jobs(
    a: httpx.Client, b: httpx.Client
) -> None:
    response = a.post("/v1/batches", json={"jobs": [{"path": SVS.name}] * 5})
    assert response.status_code == 202 and response.headers["retry-after"]
    batch = response.json()
    _problem(b.get(f"/v1/batches/{batch['id']}"), 404, "NOT_FOUND")
    first = a.get(f"/v1/batches/{batch['id']}", params={"limit": 2}).json()
    assert first["size"] == 5 and first["counts"]["queued"] == 5 and len(first["jobs"]) == 2
    seen = [j["id"] for j in first["jobs"]]
    token = first["next_page_token"]
    while token:
        page = a.get(f"/v1/batches/{batch['id']}", params={"limit": 2, "page_token": token})
        seen += [j["id"] for j in page.json()["jobs"]]
        token = page.json()["next_page_token"]
    assert seen == [j["id"] for j in batch["jobs"]] and len(set(seen)) == 5


def test_references_come_back_and_jobs_list_by_reference_digest_and_path_in_pages(
    a: httpx.Client, b: httpx.Client
) -> None:
    meta = {"site": "north", "block": 3}
    ids = []
    for _ in range(5):
        response = a.post(
            "/v1/jobs", json={"path": SVS.name, "reference": "ACC-7781", "metadata": meta}
        )
        assert response.status_code == 202 and int(response.headers["retry-after"]) > 0
        ids.append(response.json()["id"])
    view = a.get(f"/v1/jobs/{ids[0]}")
    assert view.json()["reference"] == "ACC-7781" and view.json()["metadata"] == meta
    assert int(view.headers["retry-after"]) > 0
    assert view.json()["slide_name"] == SVS.name
    b.post("/v1/jobs", json={"path": SVS.name, "reference": "ACC-7781"})
    pages, token = [], None
    while True:
        params: dict[str, Any] = {"reference": "ACC-7781", "limit": 2}
        if token:
            params["page_token"] = token
        body = a.get("/v1/jobs", params=params).json()
        pages.append([j["id"] for j in body["items"]])
        token = body["next_page_token"]
        if not token:
            break
    listed = [i for page in pages for i in page]
    assert listed == ids[::-1] and max(len(p) for p in pages) == 2
    by_path = [j["id"] for j in a.get("/v1/jobs", params={"path": SVS.name}).json()["items"]]
    assert set(ids) <= set(by_path)
    assert a.get("/v1/jobs", params={"reference": "NOPE"}).json()["items"] == []
    big = {"k": "x" * 5000}
    _problem(a.post("/v1/jobs", json={"path": SVS.name, "metadata": big}), 422, "INVALID_REQUEST")


def test_keys_made_by_the_command_act_for_their_client_and_stop_at_once_when_revoked(
    stack: dict[str, Any], a: httpx.Client, admin: httpx.Client
) -> None:
    made = _keys(stack, "create", "--client", "lab-c", "--scope", "read", "--json")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["client"] == "lab-c" and created["scopes"] == ["read"]
    assert created["webhook_secret"].startswith("whsec_")
    listed = _keys(stack, "list", "--json")
    assert created["id"] in listed.stdout and created["key"] not in listed.stdout
    with client(stack["base"], created["key"]) as c:
        assert c.get("/v1/jobs").json()["items"] == []  # lab-c sees none of lab-a's jobs
        _problem(c.post("/v1/jobs", json={"path": SVS.name}), 403, "FORBIDDEN")
        rotated = json.loads(_keys(stack, "rotate", created["id"], "--json").stdout)
        _problem(c.get("/v1/jobs"), 401, "UNAUTHENTICATED")
    with client(stack["base"], rotated["key"]) as c:
        assert c.get("/v1/jobs").status_code == 200
        assert _keys(stack, "revoke", rotated["id"]).returncode == 0
        _problem(c.get("/v1/jobs"), 401, "UNAUTHENTICATED")
    expired = _keys(stack, "create", "--client", "lab-c", "--expires-at", "2001-01-01", "--json")
    with client(stack["base"], json.loads(expired.stdout)["key"]) as c:
        _problem(c.get("/v1/jobs"), 401, "UNAUTHENTICATED")
    actions = [e["action"] for e in _audit(admin, client="lab-c", limit=50)]
    assert {"key.create", "key.rotate", "key.revoke", "auth.forbidden"} <= set(actions)
    refused = _audit(admin, action="auth.refused", limit=5)
    assert refused and refused[0]["outcome"] == "refused" and refused[0]["status"] == 401
    _problem(a.get("/v1/audit"), 403, "FORBIDDEN")


def test_the_audit_log_is_a_json_lines_file_paged_newest_first_with_a_cursor(
    stack: dict[str, Any], a: httpx.Client, admin: httpx.Client
) -> None:
    for _ in range(3):
        a.post("/v1/jobs", json={"path": SVS.name, "reference": "AUDIT-PAGES"})
    first = admin.get("/v1/audit", params={"action": "job.submit", "limit": 2}).json()
    second = admin.get(
        "/v1/audit",
        params={"action": "job.submit", "limit": 2, "page_token": first["next_page_token"]},
    ).json()
    ids = [e["id"] for e in first["items"] + second["items"]]
    assert len(ids) == len(set(ids)) == 4
    assert [e["ms"] for e in first["items"] + second["items"]] == sorted(
        (e["ms"] for e in first["items"] + second["items"]), reverse=True
    )
    lines = (stack["data"] / "audit" / "audit.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert {e["id"] for e in logged} >= set(ids)
    assert all("key" not in e and "reference" not in e for e in logged)


def test_a_slide_is_deleted_with_its_jobs_only_when_none_runs(
    a: httpx.Client, b: httpx.Client, stack: dict[str, Any], admin: httpx.Client
) -> None:
    body = os.urandom(2048)
    digest = hashlib.sha256(body).hexdigest()
    stored = stack["data"] / "slides" / digest[:2] / f"{digest}.svs"
    _upload(a, body, "a.svs")
    _upload(b, body, "b.svs")
    job = a.post("/v1/jobs", json={"slide_id": digest}).json()
    _problem(a.delete(f"/v1/slides/{digest}"), 409, "SLIDE_IN_USE")
    a.post(f"/v1/jobs/{job['id']}/cancel")
    assert a.delete(f"/v1/slides/{digest}").status_code == 204
    _problem(a.get(f"/v1/jobs/{job['id']}"), 404, "JOB_NOT_FOUND")
    _problem(a.get(f"/v1/slides/{digest}"), 404, "NOT_FOUND")
    assert stored.exists()  # B still holds these bytes
    assert b.get(f"/v1/slides/{digest}").json()["filename"] == "b.svs"
    assert b.delete(f"/v1/slides/{digest}").status_code == 204
    assert not stored.exists()
    _problem(b.delete(f"/v1/slides/{digest}"), 404, "NOT_FOUND")
    assert _audit(admin, slide_sha256=digest, action="slide.delete", outcome="ok")


def test_a_failed_jobs_result_is_409_with_its_problem_in_the_apis_words(
    stack: dict[str, Any], a: httpx.Client
) -> None:
    job = a.post("/v1/jobs", json={"path": SVS.name, "reference": "ACC-FAIL"}).json()
    store = JobStore(redis_client(stack["redis_url"]))
    record = store.get(job["id"])
    assert record is not None
    assert store.claim(job["id"], "w1", lease_ms=60_000, max_attempts=3).outcome == "claimed"
    message = (
        f"No tissue found in {record.slide_path}; lower --tissue-threshold or check the mpp "
        "(--mpp)."
    )
    store.finish(job["id"], "w1", JobState.FAILED, error={"code": "NO_TISSUE", "message": message})
    for url in (f"/v1/jobs/{job['id']}/result", f"/v1/jobs/{job['id']}/artifacts/heatmap.png"):
        problem = _problem(a.get(url), 409, "NO_TISSUE")
        assert problem["job_state"] == "failed"
        assert str(SLIDES_DIR) not in problem["detail"] and SVS.name in problem["detail"]
        assert "options.tissue_threshold" in problem["detail"] and "--" not in problem["detail"]
    shown = a.get(f"/v1/jobs/{job['id']}").json()
    assert str(SLIDES_DIR) not in json.dumps(shown) and "retry-after" not in shown


def test_webhooks_are_signed_with_the_clients_own_secret_and_carry_its_reference(
    stack: dict[str, Any],
) -> None:
    made = json.loads(_keys(stack, "create", "--client", "lab-hook", "--json").stdout)
    with WebhookReceiver() as receiver, client(stack["base"], made["key"]) as c:
        job = c.post(
            "/v1/jobs",
            json={"path": SVS.name, "reference": "ACC-HOOK", "callback_url": receiver.url},
        ).json()
        assert c.post(f"/v1/jobs/{job['id']}/cancel").json()["took_effect"] is True
        headers, body = receiver.wait_for(job["id"])
    event = verify(made["webhook_secret"], headers, body)
    WebhookEvent.model_validate(event)  # the body is what the OpenAPI document's webhook says
    assert event["data"]["reference"] == "ACC-HOOK" and event["data"]["client"] == "lab-hook"
    with pytest.raises(ValueError, match="signature"):
        verify(WEBHOOK_SECRET, headers, body)


def _succeed(stack: dict[str, Any], job_id: str, result: dict[str, Any]) -> None:
    """Finish a job as a worker would, with a stored result (no model needed here)."""
    store = JobStore(redis_client(stack["redis_url"]))
    assert store.claim(job_id, "w1", lease_ms=60_000, max_attempts=3).outcome == "claimed"
    key = hashlib.sha256(json.dumps(result, sort_keys=True).encode()).hexdigest()
    folder = stack["data"] / "results" / key[:2] / key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(result))
    (folder / "heatmap.png").write_bytes(b"\x89PNG fake")
    store.finish(job_id, "w1", JobState.SUCCEEDED, result_key=key)


def test_a_shared_result_names_the_slide_as_each_client_uploaded_it_and_reads_are_audited(
    stack: dict[str, Any], a: httpx.Client, b: httpx.Client, admin: httpx.Client
) -> None:
    body = os.urandom(1024)
    digest = hashlib.sha256(body).hexdigest()
    _upload(a, body, "A-case-17.svs")
    _upload(b, body, "B-block-2.svs")
    job_a = a.post("/v1/jobs", json={"slide_id": digest, "reference": "ACC-A"}).json()
    job_b = b.post("/v1/jobs", json={"slide_id": digest, "metadata": {"lab": "b"}}).json()
    server_path = str(stack["data"] / "slides" / digest[:2] / f"{digest}.svs")
    stored = {"slide": {"path": server_path, "name": "A-case-17.svs", "sha256": digest},
              "predictions": [{"name": "stain", "label": "he"}]}  # fmt: skip
    _succeed(stack, job_a["id"], stored)
    _succeed(stack, job_b["id"], stored)  # the same stored result (same bytes, model, options)
    seen_a = a.get(f"/v1/jobs/{job_a['id']}/result")
    seen_b = b.get(f"/v1/jobs/{job_b['id']}/result").json()
    assert seen_a.status_code == 200 and "retry-after" not in seen_a.headers
    assert seen_a.json()["slide"]["name"] == seen_a.json()["slide"]["path"] == "A-case-17.svs"
    assert seen_a.json()["job"] == {
        "job_id": job_a["id"], "client": "lab-a", "reference": "ACC-A", "metadata": None
    }  # fmt: skip
    assert seen_b["slide"]["name"] == "B-block-2.svs" and seen_b["job"]["metadata"] == {"lab": "b"}
    assert str(stack["data"]) not in seen_a.text + json.dumps(seen_b)
    png = b.get(f"/v1/jobs/{job_b['id']}/artifacts/heatmap.png")
    assert png.content == b"\x89PNG fake"
    for response in (png, seen_a):  # RFC 9530 checksum of what was sent
        expected = base64.b64encode(hashlib.sha256(response.content).digest()).decode()
        assert response.headers["content-digest"] == f"sha-256=:{expected}:"
    _problem(b.get(f"/v1/jobs/{job_a['id']}/artifacts/heatmap.png"), 404, "JOB_NOT_FOUND")
    reads = _audit(admin, slide_sha256=digest, outcome="ok")
    assert {(e["action"], e["client"]) for e in reads} >= {
        ("result.read", "lab-a"), ("result.read", "lab-b"), ("artifact.download", "lab-b")
    }  # fmt: skip
    assert all(e["source"] == "127.0.0.1" and e["ms"] > 0 for e in reads)


def test_a_flood_of_bad_keys_is_logged_up_to_a_bound_per_source_and_minute(
    stack: dict[str, Any], admin: httpx.Client
) -> None:
    before = len(_audit(admin, action="auth.refused", limit=1000))
    with client(stack["base"], "flood-" + "x" * 30) as bad:
        # Three times the bound: even when the run straddles a minute, one bucket overflows.
        for _ in range(3 * REFUSALS_LOGGED_PER_MINUTE):
            assert bad.get("/v1/models").status_code == 401
    refused = _audit(admin, action="auth.refused", limit=1000)
    assert len(refused) - before <= 2 * (REFUSALS_LOGGED_PER_MINUTE + 1)
    assert any("not logged" in (e.get("detail") or "") for e in refused)
