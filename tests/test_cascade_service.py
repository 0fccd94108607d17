"""The cascade through the service: a worker serving a CellEcoNet package answers a job with
``"tasks": ["recurrence_risk"]`` with the risk, the regions read and cells.geojson (real API,
Redis and worker processes, as tests/test_service_e2e.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.embedded_redis import EmbeddedRedis
from tests.cascade_helpers import add_cascade
from tests.conftest import SLIDES_DIR
from tests.service_helpers import client, service_env, start_api, start_worker, wait_job, wait_ready
from xmag.package import CascadeSpec

SVS = SLIDES_DIR / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def http(default_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    data = tmp_path_factory.mktemp("cascade-service")
    model = add_cascade(default_package, data / "model", CascadeSpec(k=2))
    redis_server = EmbeddedRedis(data / "redis").start()
    env = service_env(redis_server.url, data, model, XMAG_SLIDE_ROOTS=str(SLIDES_DIR))
    api, base = start_api(env, data / "api.log")
    worker = start_worker(env, data / "worker.log")
    try:
        with client(base) as h:
            wait_ready(h)
            yield h
    finally:
        worker.stop()
        api.stop()
        redis_server.stop()


def test_a_recurrence_risk_job_returns_the_risk_the_regions_read_and_the_cells(
    http: httpx.Client,
) -> None:
    models = http.get("/v1/models").json()["models"]
    assert models[0]["card"]["cascade"]["task"] == "recurrence_risk"
    job = http.post("/v1/jobs", json={"path": SVS.name, "tasks": ["recurrence_risk"]})
    assert job.status_code in (200, 201, 202), job.text
    job = wait_job(http, job.json()["id"], timeout_s=300)
    assert job["state"] == "succeeded", job
    result = http.get(job["links"]["result"]).json()
    assert [p["name"] for p in result["predictions"]] == ["recurrence_risk"]
    cascade = result["cascade"]
    assert cascade["risk"] is not None and 0 < cascade["probability"] < 1
    assert 1 <= len(cascade["regions"]) <= 2 and cascade["cells"] > 0
    assert result["artifacts"]["cells"] == "cells.geojson"
    cells = http.get(job["links"]["cells.geojson"])
    assert cells.status_code == 200
    assert len(cells.json()["features"]) == cascade["cells"]
    png = http.get(job["links"]["cascade_heatmap.png"])
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
