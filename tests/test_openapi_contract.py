"""The OpenAPI document describes what the service does: a schemathesis run with every check on,
against a live API on a real Redis with real keys, finds no failure.

Two runs of the ``st`` command (examples, coverage, fuzzing and stateful phases; 5 examples per
operation): every operation as client lab-a, with lab-b as its peer for schemathesis'
``object_level_authorization`` probes (a Web Fuzzing Commons auth file with both keys), then the
admin-only audit log with an admin key. ``tests/schemathesis.toml`` says why a documented 422 is
an acceptable answer to schema-valid data. The document itself is checked for what a client
needs: problem+json on every error, the one-of rule of a job request, the artifact enum, the
checksum headers and Retry-After. A typed client generated from the document
(``tests/openapi_codegen.py``) passes ``mypy --strict``, refuses misuse, and works against it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SLIDES_DIR
from tests.openapi_codegen import generate_client
from tests.service_helpers import ROOT, api_stack, client
from xmag.store import ARTIFACTS

KEY_A = "contract-a-key-0123456789abcdef0123"
KEY_B = "contract-b-key-0123456789abcdef0123"
KEY_ADMIN = "contract-admin-key-0123456789abcdef"
ST = Path(sys.executable).with_name("st")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    keys = f"{KEY_A}@lab-a,{KEY_B}@lab-b,{KEY_ADMIN}:admin@ops"
    with api_stack(tmp_path_factory.mktemp("contract"), keys) as stack:
        yield stack.base, stack.data


@pytest.fixture(scope="module")
def document(live: tuple[str, Path]) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{live[0]}/openapi.json").json()
    return body


def _st(base: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(ST),
            "--config-file",
            str(ROOT / "tests" / "schemathesis.toml"),
            "run",
            f"{base}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            "5",
            "--generation-deterministic",
            "--continue-on-failure",
            "--request-timeout",
            "10",
            "--report-dir",
            str(tmp),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
        cwd=tmp,
    )


def test_every_operation_passes_every_schemathesis_check_as_two_clients(
    live: tuple[str, Path], tmp_path: Path
) -> None:
    auth = {
        "auth": [
            {"name": name, "fixedHeaders": [{"name": "Authorization", "value": f"Bearer {key}"}]}
            for name, key in (("lab-a", KEY_A), ("lab-b", KEY_B))
        ]
    }
    (tmp_path / "auth.json").write_text(json.dumps(auth))
    run = _st(
        live[0],
        tmp_path,
        "--auth-wfc",
        str(tmp_path / "auth.json"),
        # /readyz answers 503 by design (no worker runs here); /v1/audit is admin-only (below).
        "--exclude-path",
        "/readyz",
        "--exclude-path",
        "/v1/audit",
    )
    summary = run.stdout[run.stdout.find("SUMMARY") :]
    assert run.returncode == 0, run.stdout[-6000:]
    assert "✅ Stateful" in summary and "0 passed" not in summary, summary


def test_the_audit_log_operation_passes_every_check_as_an_admin(
    live: tuple[str, Path], tmp_path: Path
) -> None:
    # One read-only operation: no links, so no stateful phase.
    run = _st(
        live[0],
        tmp_path,
        "-H",
        f"Authorization: Bearer {KEY_ADMIN}",
        "--include-path",
        "/v1/audit",
        "--phases",
        "examples,coverage,fuzzing",
    )
    assert run.returncode == 0, run.stdout[-6000:]


def test_every_error_response_is_documented_as_problem_json(document: dict[str, Any]) -> None:
    assert "Problem" in document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")) and status != "503":
                    content = response.get("content", {})
                    schema = content.get("application/problem+json", {}).get("schema", {})
                    assert schema == {"$ref": "#/components/schemas/Problem"}, (
                        method,
                        path,
                        status,
                    )


def test_the_document_states_the_rules_a_client_needs(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    one_of = schemas["JobRequest"]["oneOf"]
    assert [s["required"] for s in one_of] == [["slide_id"], ["path"]]
    assert {"reference", "metadata"} <= set(schemas["JobRequest"]["properties"])
    assert "JobResult" in schemas and "job" in schemas["JobResult"]["properties"]
    jobs = document["paths"]["/v1/jobs/{job_id}"]["get"]
    assert "Retry-After" in jobs["responses"]["200"]["headers"]
    submit = document["paths"]["/v1/jobs"]["post"]["responses"]["202"]
    assert {"Retry-After", "Location"} <= set(submit["headers"]) and submit["links"]
    artifact = document["paths"]["/v1/jobs/{job_id}/artifacts/{name}"]["get"]
    name = next(p for p in artifact["parameters"] if p["name"] == "name")
    assert name["schema"]["enum"] == sorted(ARTIFACTS)
    result = document["paths"]["/v1/jobs/{job_id}/result"]["get"]["responses"]
    assert result["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobResult")
    assert {"404", "409"} <= set(result)
    assert "Content-Digest" in result["200"]["headers"]
    assert "Content-Digest" in artifact["responses"]["200"]["headers"]
    upload = document["paths"]["/v1/slides"]["put"]
    headers = {p["name"] for p in upload["parameters"] if p["in"] == "header"}
    assert {"X-Content-SHA256", "Content-Digest"} <= headers
    assert document["paths"]["/v1/slides/{slide_id}"]["delete"]["responses"]["409"]
    assert "/v1/audit" in document["paths"]
    hook = document["webhooks"]["job-finished"]["post"]["requestBody"]["content"]
    assert hook["application/json"]["schema"]["$ref"].endswith("/WebhookEvent")
    assert "reference" in schemas["WebhookEventData"]["properties"]


def test_errors_use_the_apis_words_and_never_show_server_paths(live: tuple[str, Path]) -> None:
    with client(live[0], KEY_A) as http:
        for response in (
            http.post("/v1/jobs", json={"path": "nope/missing.svs"}),
            http.post("/v1/jobs", json={"path": str(SLIDES_DIR / "missing.svs")}),
            http.post("/v1/jobs", json={"path": "/etc/passwd"}),
        ):
            assert response.status_code == 422, response.text
            assert str(live[1]) not in response.text and str(SLIDES_DIR) not in response.text
            assert "XMAG_" not in response.json()["detail"], response.json()["detail"]


_USES = """
from xmag_client import Client, JobView

def use(api: Client) -> str:
    job: JobView = api.submit_job({"path": "a.svs", "reference": "R-1", "metadata": {"k": 1}})
    page = api.list_jobs(reference="R-1", limit=10, page_token=job["id"])
    api.get_job_artifact(job["id"], "heatmap.png")
    return job["state"] + str(page["next_page_token"])
"""
_MISUSES = """
from xmag_client import Client

def misuse(api: Client) -> None:
    api.submit_job({"path": 3})
    api.get_job_artifact("job_1", "passwd")
    count: int = api.get_job("job_1")["id"]
    api.cancel_job("job_1")["took_effect"].upper()
"""


def _load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("xmag_client", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_client_generated_from_the_document_type_checks_and_works(
    live: tuple[str, Path], document: dict[str, Any], tmp_path: Path
) -> None:
    (tmp_path / "xmag_client.py").write_text(generate_client(document))
    (tmp_path / "uses.py").write_text(_USES)
    (tmp_path / "misuses.py").write_text(_MISUSES)
    mypy = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--no-error-summary"]
    checked = subprocess.run(
        [*mypy, "xmag_client.py", "uses.py"], cwd=tmp_path, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout
    refused = subprocess.run(
        [*mypy, "misuses.py"], cwd=tmp_path, capture_output=True, text=True
    ).stdout
    assert refused.count("misuses.py:") >= 4, refused  # each misuse is a type error

    generated = _load(tmp_path / "xmag_client.py")
    a, b = generated.Client(live[0], KEY_A), generated.Client(live[0], KEY_B)
    try:
        slide = a.upload_slide(b"not a slide, just bytes", filename="GEN-1.svs")
        job = a.submit_job({"slide_id": slide["slide_id"], "reference": "GEN-1"})
        assert a.get_job(job["id"])["slide_name"] == "GEN-1.svs"
        assert [j["id"] for j in a.list_jobs(reference="GEN-1")["items"]] == [job["id"]]
        with pytest.raises(generated.ApiProblem) as refused_read:
            b.get_job(job["id"])
        assert refused_read.value.status == 404
        assert refused_read.value.problem["code"] == "JOB_NOT_FOUND"
        assert a.cancel_job(job["id"])["took_effect"] is True
        with pytest.raises(generated.ApiProblem) as canceled:
            a.get_job_result(job["id"])
        assert canceled.value.status == 409 and canceled.value.problem["code"] == "JOB_CANCELED"
        a.delete_slide(slide["slide_id"])
    finally:
        a.close()
        b.close()
