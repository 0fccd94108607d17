"""The viewer's endpoints over real HTTP on a real Redis (no worker needed): Deep Zoom descriptor
and tiles of an upload and of a job's slide, auth, typed 4xx answers for bad tile addresses,
caching headers, the tissue outline and the static UI; plus the bounded caches behind them."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.viewer import ReaderCache, SlideKey, TileCache
from tests.conftest import SLIDES_DIR
from tests.service_helpers import API_KEY, READ_KEY, api_stack, client, upload

SVS = SLIDES_DIR / "CMU-1-Small-Region.svs"  # 2220 x 2967, one level
OME = SLIDES_DIR / "OS-2-ndpi.ome.tif"
UI_BUILT = (
    Path(__file__).resolve().parents[1] / "service" / "ui" / "dist" / "index.html"
).is_file()
OTHER_CLIENT_KEY = "viewer-lab-b-key-0123456789abcdef"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    keys = f"{API_KEY},{READ_KEY}:read,{OTHER_CLIENT_KEY}@lab-b"
    with api_stack(tmp_path_factory.mktemp("viewer"), keys) as stack:
        yield stack.base


@pytest.fixture
def http(base: str) -> Iterator[httpx.Client]:
    with client(base) as c:
        yield c


@pytest.fixture(scope="module")
def slide_id(base: str) -> str:
    with client(base) as c:
        return upload(c, SVS)


@pytest.fixture(scope="module")
def job_id(base: str) -> str:
    """A job on a slide by reference; it stays queued (no worker): its slide can still be viewed."""
    with client(base) as c:
        response = c.post("/v1/jobs", json={"path": OME.name})
        assert response.status_code == 202, response.text
        return str(response.json()["id"])


def _problem(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == code
    return body


def test_tiles_and_descriptors_refuse_a_missing_or_wrong_key(base: str, slide_id: str) -> None:
    paths = [
        f"/v1/slides/{slide_id}/slide.dzi",
        f"/v1/slides/{slide_id}/slide_files/12/0_0.jpeg",
        f"/v1/slides/{slide_id}/tissue.geojson",
    ]
    for key in (None, "x" * 40):
        with client(base, key=key) as anonymous:
            for path in paths:
                refused = anonymous.get(path)
                _problem(refused, 401, "UNAUTHENTICATED")
                assert refused.headers["www-authenticate"].startswith("Bearer")
    with client(base, key=READ_KEY) as reader:
        assert reader.get(paths[1]).status_code == 200


def test_another_client_gets_404_for_the_slides_and_jobs_it_does_not_own(
    base: str, slide_id: str, job_id: str
) -> None:
    with client(base, key=OTHER_CLIENT_KEY) as other:
        for path in ("slide.dzi", "slide_files/12/0_0.jpeg", "tissue.geojson"):
            _problem(other.get(f"/v1/slides/{slide_id}/{path}"), 404, "NOT_FOUND")
            _problem(other.get(f"/v1/jobs/{job_id}/{path}"), 404, "JOB_NOT_FOUND")


def test_an_upload_has_a_dzi_of_its_size_and_jpeg_tiles_with_private_caching(
    http: httpx.Client, slide_id: str
) -> None:
    dzi = http.get(f"/v1/slides/{slide_id}/slide.dzi")
    assert dzi.status_code == 200 and dzi.headers["content-type"].startswith("application/xml")
    assert 'TileSize="254"' in dzi.text and 'Overlap="1"' in dzi.text
    assert '<Size Width="2220" Height="2967"/>' in dzi.text
    tile = http.get(f"/v1/slides/{slide_id}/slide_files/12/1_1.jpeg")
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(tile.content)).size == (256, 256)
    assert tile.headers["cache-control"] == "private, max-age=3600"
    assert "Authorization" in tile.headers["vary"]
    etag = tile.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')
    again = http.get(
        f"/v1/slides/{slide_id}/slide_files/12/1_1.jpeg", headers={"If-None-Match": etag}
    )
    assert again.status_code == 304 and again.headers["etag"] == etag and not again.content
    other = http.get(f"/v1/slides/{slide_id}/slide_files/12/0_1.jpeg")
    assert other.headers["etag"] != etag


def test_a_job_by_reference_serves_its_slide_and_bad_addresses_get_typed_4xx(
    http: httpx.Client, job_id: str
) -> None:
    dzi = http.get(f"/v1/jobs/{job_id}/slide.dzi")
    assert dzi.status_code == 200, dzi.text
    top = http.get(f"/v1/jobs/{job_id}/slide_files/0/0_0.jpeg")
    assert top.status_code == 200 and Image.open(io.BytesIO(top.content)).size == (1, 1)
    missing_level = _problem(
        http.get(f"/v1/jobs/{job_id}/slide_files/40/0_0.jpeg"), 404, "NOT_FOUND"
    )
    assert missing_level["fields"]["level"] == 40 and "levels are 0.." in missing_level["detail"]
    _problem(http.get(f"/v1/jobs/{job_id}/slide_files/1/9_0.jpeg"), 404, "NOT_FOUND")
    _problem(http.get(f"/v1/jobs/{job_id}/slide_files/1/0_9.jpeg"), 404, "NOT_FOUND")
    for bad in (
        "-1/0_0.jpeg",
        "x/0_0.jpeg",
        "65/0_0.jpeg",
        "1/a_0.jpeg",
        "1/0_0.png",
        "1/0-0.jpeg",
    ):
        _problem(http.get(f"/v1/jobs/{job_id}/slide_files/{bad}"), 422, "INVALID_REQUEST")
    _problem(http.get("/v1/jobs/job_nope/slide.dzi"), 404, "JOB_NOT_FOUND")
    _problem(http.get(f"/v1/slides/{'0' * 64}/slide.dzi"), 404, "NOT_FOUND")
    _problem(http.get("/v1/slides/not-a-sha/slide.dzi"), 422, "INVALID_REQUEST")


def test_an_upload_that_is_not_a_slide_is_refused_with_its_reader_error(
    http: httpx.Client,
) -> None:
    not_a_slide = http.put(
        "/v1/slides", params={"filename": "notes.svs"}, content=b"plain text, not a slide\n" * 40
    )
    assert not_a_slide.status_code == 201, not_a_slide.text
    sha = not_a_slide.json()["slide_id"]
    for path in ("slide.dzi", "slide_files/0/0_0.jpeg", "tissue.geojson"):
        refused = _problem(http.get(f"/v1/slides/{sha}/{path}"), 422, "UNSUPPORTED_FORMAT")
        assert "convert it" in refused["detail"]


def test_the_tissue_outline_is_polygons_inside_the_slide(http: httpx.Client, slide_id: str) -> None:
    outline = http.get(f"/v1/slides/{slide_id}/tissue.geojson")
    assert outline.status_code == 200
    doc = outline.json()
    assert doc["type"] == "FeatureCollection" and doc["features"]
    for feature in doc["features"]:
        for ring in feature["geometry"]["coordinates"]:
            assert ring[0] == ring[-1] and len(ring) >= 4
            assert all(-1 <= x <= 2221 and -1 <= y <= 2968 for x, y in ring)


@pytest.mark.skipif(not UI_BUILT, reason="the UI is not built: run `make ui`")
def test_the_ui_is_served_without_a_key_with_a_strict_content_security_policy(base: str) -> None:
    with client(base, key=None) as anonymous:
        page = anonymous.get("/ui/")
        assert page.status_code == 200 and "<title>xmag-serve viewer</title>" in page.text
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp
        assert anonymous.get("/ui", follow_redirects=False).status_code == 307
        assert anonymous.get("/ui/vendor/openseadragon.min.js").status_code == 200
        _problem(anonymous.get("/ui/..%2F..%2Fpyproject.toml"), 404, "NOT_FOUND")
        _problem(anonymous.get("/ui/nope.js"), 404, "NOT_FOUND")
        assert "/ui/" not in anonymous.get("/openapi.json").json()["paths"]


def test_the_reader_cache_keeps_a_bounded_number_of_slides_and_closes_evicted_ones() -> None:
    cache = ReaderCache(capacity=2)
    keys = [SlideKey.of(SLIDES_DIR / n) for n in (SVS.name, OME.name, "OS-1-detail.ome.tif")]
    with cache.use(keys[0]) as first:
        for key in keys[1:]:
            with cache.use(key):
                pass
        assert len(cache) == 2 and not first.reader._closed  # in use: closed when released
    assert first.reader._closed
    with cache.use(keys[2]) as again:
        assert not again.reader._closed
    cache.close()


def test_the_tile_cache_is_bounded_in_bytes() -> None:
    cache = TileCache(max_bytes=100)
    for i in range(10):
        cache.put(f"t{i}", bytes(30))
    assert cache.size_bytes <= 100 and len(cache) == 3
    assert cache.get("t9") is not None and cache.get("t0") is None
    cache.put("huge", bytes(101))
    assert cache.get("huge") is None
