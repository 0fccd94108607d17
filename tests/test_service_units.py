"""Service parts that need no server: status table, webhook signatures, slide references, keys."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

import service.errors
import service.webhooks  # registers WebhookDeliveryError in the error tree
from service.auth import Scope, parse_key_entry
from service.problems import STATUS_BY_CODE
from service.schemas import JobRequest
from service.settings import ServiceSettings
from service.slides import resolve_reference, safe_extension
from service.store import JobRecord
from service.webhooks import build_event, sign, verify
from xmag.errors import SlideNotFoundError, all_error_codes


def test_every_error_code_of_the_tree_has_an_http_status() -> None:
    unmapped = sorted(set(all_error_codes()) - set(STATUS_BY_CODE))
    assert not unmapped, f"add these codes to service.problems.STATUS_BY_CODE: {unmapped}"


def test_input_errors_map_to_client_statuses_and_runtime_faults_to_server_statuses() -> None:
    for code, cls in all_error_codes().items():
        status = STATUS_BY_CODE[code]
        assert 400 <= status < 600, code
        if issubclass(cls, service.errors.RequestError):
            assert 400 <= status < 500, code


def test_webhook_signature_matches_the_standard_webhooks_reference_vector() -> None:
    # Test vector published with the Standard Webhooks specification (standardwebhooks.com).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    signature = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, '{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_webhook_verification_refuses_a_tampered_body() -> None:
    import time

    secret = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTEyMzQ="
    ts = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, "msg_1", ts, '{"a":1}'),
    }
    assert verify(secret, headers, '{"a":1}') == {"a": 1}
    with pytest.raises(ValueError, match="signature"):
        verify(secret, headers, '{"a":2}')


def test_webhook_body_carries_the_error_code_but_never_the_message_or_a_path() -> None:
    record = JobRecord.from_hash(
        {
            "id": "job_1",
            "state": "failed",
            "error": '{"code": "UNSUPPORTED_FORMAT", "message": "/slides/PATIENT-DOE-JOHN.svs"}',
            "slide_path": "/slides/PATIENT-DOE-JOHN.svs",
            "result_url": "http://x/v1/jobs/job_1/result",
        }
    )
    event = build_event(record)
    text = str(event)
    assert event["data"]["error_code"] == "UNSUPPORTED_FORMAT"
    assert "PATIENT" not in text and "/slides" not in text
    assert event["data"]["result_url"] is None


def test_a_reference_under_a_root_resolves_to_its_real_path(tmp_path: Path) -> None:
    (tmp_path / "case").mkdir()
    slide = tmp_path / "case" / "a.svs"
    slide.write_bytes(b"x")
    assert resolve_reference(str(slide), [tmp_path]) == slide.resolve()
    assert resolve_reference("case/a.svs", [tmp_path]) == slide.resolve()
    assert resolve_reference(f"file://{slide}", [tmp_path]) == slide.resolve()


@pytest.mark.parametrize(
    "reference",
    [
        "../etc/passwd",
        "case/../../etc/passwd",
        "/etc/passwd",
        "s3://bucket/slide.svs",
        "http://example.org/slide.svs",
        "file://otherhost/slide.svs",
        "case/\x00.svs",
    ],
)
def test_traversal_foreign_paths_and_unknown_schemes_are_refused(
    tmp_path: Path, reference: str
) -> None:
    (tmp_path / "case").mkdir()
    with pytest.raises(service.errors.SlideReferenceError):
        resolve_reference(reference, [tmp_path])


def test_a_symlink_out_of_the_roots_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.svs").write_bytes(b"x")
    os.symlink(outside / "secret.svs", root / "link.svs")
    with pytest.raises(service.errors.SlideReferenceError, match="outside"):
        resolve_reference("link.svs", [root])


def test_a_missing_reference_is_slide_not_found(tmp_path: Path) -> None:
    with pytest.raises(SlideNotFoundError):
        resolve_reference("nothing.svs", [tmp_path])


def test_references_are_refused_when_no_root_is_configured(tmp_path: Path) -> None:
    with pytest.raises(service.errors.SlideReferenceError, match="XMAG_SLIDE_ROOTS"):
        resolve_reference(str(tmp_path), [])


def test_only_a_plain_extension_survives_from_a_client_file_name() -> None:
    assert safe_extension("DOE^JOHN 1234.SVS") == ".svs"
    assert safe_extension("x.ome.tif") == ".ome.tif"
    assert safe_extension("../../weird.ext;rm -rf") == ""
    assert safe_extension(None) == ""


def test_api_key_entries_give_scopes_and_clients_and_refuse_short_keys() -> None:
    assert parse_key_entry("k" * 20) == ("k" * 20, frozenset({Scope.READ, Scope.SUBMIT}), "default")
    assert parse_key_entry("k" * 20 + ":read")[1] == frozenset({Scope.READ})
    assert parse_key_entry("k" * 20 + ":admin@ops")[1:] == (frozenset({Scope.ADMIN}), "ops")
    with pytest.raises(ValueError, match="characters"):
        parse_key_entry("short")
    with pytest.raises(ValueError, match="scope"):
        parse_key_entry("k" * 20 + ":root")
    with pytest.raises(ValueError, match="client"):
        parse_key_entry("k" * 20 + "@Bad Name")


def test_settings_read_the_documented_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/0")
    monkeypatch.setenv("XMAG_API_KEYS", "a" * 20 + ", " + "b" * 20 + ":read")
    monkeypatch.setenv("XMAG_SLIDE_ROOTS", "/slides,/archive")
    settings = ServiceSettings()
    assert settings.redis_url == "redis://cache:6379/0"
    assert settings.api_keys == ["a" * 20, "b" * 20 + ":read"]
    assert settings.slide_roots == [Path("/slides"), Path("/archive")]


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.org/x", "gopher://h/", "javascript:alert(1)"]
)
def test_a_callback_url_must_be_http_or_https(url: str) -> None:
    with pytest.raises(ValidationError):
        JobRequest(path="a.svs", callback_url=url)
    assert JobRequest(path="a.svs", callback_url="https://lis.example.org/hook").callback_url


@pytest.mark.parametrize(
    ("url", "allowed", "refused"),
    [
        ("https://lis.example.org/hook", [], False),
        ("http://10.1.2.3:8080/hook", [], False),  # an LIS on the hospital network
        ("http://169.254.169.254/latest/meta-data/", [], True),
        ("http://[fe80::1]/x", [], True),
        ("http://metadata.google.internal/", [], True),
        ("https://lis.example.org/hook", ["lis.example.org"], False),
        ("https://a.lis.example.org/hook", ["*.example.org"], False),
        ("https://example.org/hook", ["*.example.org"], True),
        ("https://evil.org/hook", ["*.example.org", "10.0.0.0/8"], True),
        ("http://10.9.8.7/hook", ["*.example.org", "10.0.0.0/8"], False),
        ("http://192.168.1.5/hook", ["10.0.0.0/8"], True),
    ],
)
def test_callback_hosts_follow_the_allowlist_and_never_reach_metadata_services(
    url: str, allowed: list[str], refused: bool
) -> None:
    from service.callbacks import check_callback_url
    from service.errors import CallbackRefusedError

    if refused:
        with pytest.raises(CallbackRefusedError) as info:
            check_callback_url(url, allowed)
        assert info.value.code == "CALLBACK_REFUSED"
    else:
        check_callback_url(url, allowed)


def test_the_callback_allowlist_is_read_from_a_comma_separated_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.settings import ServiceSettings

    monkeypatch.setenv("XMAG_CALLBACK_ALLOWED_HOSTS", "lis.example.org, 10.0.0.0/8")
    assert ServiceSettings().callback_allowed_hosts == ["lis.example.org", "10.0.0.0/8"]


def test_the_audit_stream_stays_bounded_while_the_file_keeps_every_entry(tmp_path: Path) -> None:
    from service.audit import AuditLog, audit_path
    from service.embedded_redis import EmbeddedRedis

    with EmbeddedRedis(tmp_path / "redis") as server:
        log = AuditLog(server.client(), "t", audit_path(tmp_path), stream_max_entries=200)
        for i in range(1_500):
            log.record("job.read", outcome="not_found", client="lab-a", detail=f"n{i}")
        kept = server.client().xlen(log.stream)
        newest = server.client().xrevrange(log.stream, count=1)
    # Approximate trimming drops whole macro-nodes (100 entries by default): never fewer than asked.
    assert 200 <= kept <= 400
    fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in newest[0][1].items()}
    assert json.loads(fields["e"])["detail"] == "n1499"
    lines = audit_path(tmp_path).read_text().splitlines()
    assert len(lines) == 1_500
    assert json.loads(lines[0])["detail"] == "n0"


def test_stopping_the_embedded_redis_never_stops_the_next_one_on_its_socket(
    tmp_path: Path,
) -> None:
    """`xmag serve` stopped and started again at once in one data folder: the first one's stop
    must end its own server process only, never whatever listens on the socket path by then
    (a SHUTDOWN sent to the path, retried by the client, reached the new server and left the
    new `xmag serve` answering 500s)."""
    import threading

    from service.embedded_redis import EmbeddedRedis

    folder = tmp_path / "redis"
    first = EmbeddedRedis(folder).start()
    stopping = threading.Thread(target=first.stop)
    stopping.start()
    deadline = time.monotonic() + 10
    while first.socket_path.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    second = EmbeddedRedis(folder).start()  # as soon as the socket is free
    try:
        stopping.join(timeout=30)
        time.sleep(3.0)  # longer than a client's retry backoff
        assert second.process is not None and second.process.poll() is None
        with second.client() as client:
            assert client.ping()
    finally:
        second.stop()
