"""The web viewer in a real browser: Debian's headless chromium driven by Playwright, against a real
stack (embedded Redis, the API, one worker with the placeholder model package).

Signs in with a key (a wrong key is refused), uploads a real slide through the page (sha256 in the
browser, streamed PUT), watches the job reach ``succeeded`` in the jobs list, opens the result and
checks from screenshots that the overlay is drawn over the tissue tiles and nowhere else, that it
can be toggled off and faded, and that the page logged no console error.

Skipped when chromium or Playwright is absent, or the UI is not built; ``XMAG_REQUIRE_BROWSER=1``
(set by CI) turns that skip into a failure. Screenshots go to ``XMAG_SCREENSHOT_DIR`` (default: the
test's temporary folder). Playwright never downloads a browser here: it launches
``/usr/bin/chromium`` (``XMAG_CHROMIUM`` overrides the path).
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.embedded_redis import EmbeddedRedis
from tests.conftest import SLIDES_DIR
from tests.service_helpers import (
    API_KEY,
    ROOT,
    Proc,
    client,
    service_env,
    start_api,
    start_worker,
    wait_ready,
)

CHROMIUM = Path(os.environ.get("XMAG_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
UI_INDEX = ROOT / "service" / "ui" / "dist" / "index.html"
#: Slides uploaded through the page, with the options typed into its form.
SLIDES = [
    (SLIDES_DIR / "CMU-1-Small-Region.svs", {}),  # Aperio, bright field, 3 tiles at 5x
    # Aperio with no mpp in its metadata: the job needs a default mpp.
    (SLIDES_DIR / "tcga-cr-7395-01a-01-ts1.svs", {"#opt-default-mpp": "0.5"}),
]
NO_MPP = SLIDES_DIR / "tcga-cr-7395-01a-01-ts1.svs"


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"no chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if not UI_INDEX.is_file():
        return "the UI is not built (make ui)"
    return None


@pytest.fixture(scope="module")
def browser_or_skip() -> None:
    why = _missing()
    if why is None:
        return
    if os.environ.get("XMAG_REQUIRE_BROWSER") == "1":
        pytest.fail(f"XMAG_REQUIRE_BROWSER=1 but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("XMAG_SCREENSHOT_DIR")
    folder = Path(configured) if configured else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, browser_or_skip: None
) -> Iterator[tuple[str, Proc]]:
    data = tmp_path_factory.mktemp("ui")
    model_dir = data / "model"
    subprocess.run(
        [sys.executable, "-m", "model_export.default_package", "--out", str(model_dir)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    with EmbeddedRedis(data / "redis") as redis_server:
        env = service_env(redis_server.url, data, model_dir, XMAG_SLIDE_ROOTS=str(SLIDES_DIR))
        api, base = start_api(env, data / "api.log")
        worker: Proc | None = None
        try:
            worker = start_worker(env, data / "worker.log")
            with client(base) as http:
                wait_ready(http)
            yield base, worker
        finally:
            if worker is not None:
                worker.stop()
            api.stop()


@pytest.fixture(scope="module")
def browser(stack: tuple[str, Proc]) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Page:
    """A page of the viewer that records console errors and uncaught exceptions."""

    def __init__(self, browser: Any, base: str) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.goto(f"{base}/ui/")

    def sign_in(self, key: str) -> None:
        self.page.fill("#api-key", key)
        self.page.click("#login-submit")

    def close(self) -> None:
        self.context.close()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _patch(image: np.ndarray, xy: tuple[float, float], r: int = 3) -> np.ndarray:
    x, y = round(xy[0]), round(xy[1])
    return image[y - r : y + r + 1, x - r : x + r + 1].reshape(-1, 3)


def _geometry(page: Any) -> dict[str, Any]:
    """Tiles and outline in viewer-element pixels, from the page's own viewer and overlay data."""
    return page.evaluate(
        """async () => {
            const key = sessionStorage.getItem("xmag.apiKey");
            const v = window.xmagViewer.viewer;
            const jobId = decodeURIComponent(location.hash.slice("#/job/".length));
            const auth = {headers: {Authorization: `Bearer ${key}`}};
            const get = async (p) => (await fetch(p, auth)).json();
            const tiles = await get(`/v1/jobs/${jobId}/artifacts/tiles.geojson`);
            const outline = await get(`/v1/jobs/${jobId}/tissue.geojson`);
            const el = (x, y) => {
                const p = v.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
                return [p.x, p.y];
            };
            const size = v.world.getItemAt(0).getContentSize();
            // OpenSeadragon's own controls (buttons fade, the navigator moves): not the slide.
            const box = document.getElementById("osd").getBoundingClientRect();
            const controls = [...document.querySelectorAll("#osd .navigator, #osd [title]")]
                .map((e) => e.getBoundingClientRect())
                .map((r) => [r.left - box.left, r.top - box.top, r.right - box.left,
                             r.bottom - box.top]);
            return {
                controls,
                tiles: tiles.features.map(
                    (f) => f.geometry.coordinates[0].map(([x, y]) => el(x, y))),
                outline: outline.features.flatMap((f) => f.geometry.coordinates)
                    .map((ring) => ring.map(([x, y]) => el(x, y))),
                image: [el(0, 0), el(size.x, size.y)],
            };
        }"""
    )


def _segment_distance(p: tuple[float, float], a: list[float], b: list[float]) -> float:
    ax, ay, bx, by = a[0], a[1], b[0], b[1]
    dx, dy = bx - ax, by - ay
    t = 0.0 if dx == dy == 0 else ((p[0] - ax) * dx + (p[1] - ay) * dy) / (dx * dx + dy * dy)
    t = max(0.0, min(1.0, t))
    return math.hypot(p[0] - (ax + t * dx), p[1] - (ay + t * dy))


def _away_from_overlay(geo: dict[str, Any], margin: float = 12) -> list[tuple[float, float]]:
    """Points of the slide image away from every tile, outline edge and viewer control."""
    (x0, y0), (x1, y1) = geo["image"]
    rects = [
        (min(p[0] for p in t), min(p[1] for p in t), max(p[0] for p in t), max(p[1] for p in t))
        for t in geo["tiles"]
    ] + [tuple(r) for r in geo["controls"]]
    points = []
    for fx in np.linspace(0.03, 0.97, 24):
        for fy in np.linspace(0.03, 0.97, 24):
            p = (x0 + fx * (x1 - x0), y0 + fy * (y1 - y0))
            if any(
                r[0] - margin <= p[0] <= r[2] + margin and r[1] - margin <= p[1] <= r[3] + margin
                for r in rects
            ):
                continue
            near = any(
                _segment_distance(p, ring[i], ring[i + 1]) < margin
                for ring in geo["outline"]
                for i in range(len(ring) - 1)
            )
            if not near:
                points.append(p)
    return points


def test_a_wrong_key_is_refused_and_stays_out_of_storage(
    browser: Any, stack: tuple[str, Proc]
) -> None:
    ui = Page(browser, stack[0])
    try:
        ui.sign_in("not-a-key-" + "x" * 30)
        ui.page.wait_for_selector("#login-error:not([hidden])")
        assert "UNAUTHENTICATED" in ui.page.inner_text("#login-error")
        assert ui.page.is_visible("#login-view") and not ui.page.is_visible("#jobs-view")
        assert ui.page.evaluate("sessionStorage.getItem('xmag.apiKey')") is None
    finally:
        ui.close()


@pytest.mark.parametrize(("slide", "form"), SLIDES, ids=[s.name for s, _ in SLIDES])
def test_upload_follow_and_view_a_slide_with_its_overlay_over_the_tissue(
    browser: Any, stack: tuple[str, Proc], shots: Path, slide: Path, form: dict[str, str]
) -> None:
    ui = Page(browser, stack[0])
    page = ui.page
    name = slide.stem
    try:
        ui.sign_in(API_KEY)
        page.wait_for_selector("#jobs-view:not([hidden])")
        assert page.evaluate("sessionStorage.getItem('xmag.apiKey')") == API_KEY
        assert API_KEY not in page.url
        page.click("#nav-new")
        page.wait_for_selector("input.task")  # the worker's model card lists its heads
        page.set_input_files("#slide-file", str(slide))
        for selector, value in form.items():
            page.fill(selector, value)
        started = time.monotonic()
        page.click("#submit-job")
        page.wait_for_selector("#jobs-view:not([hidden])", timeout=60_000)
        submitted = time.monotonic() - started
        row = "#jobs-table tbody tr:first-child"
        page.wait_for_selector(f"{row}[data-state=succeeded]", timeout=120_000)
        succeeded = time.monotonic() - started
        done, total = page.inner_text(f"{row} td.tiles").split(" / ")
        assert int(done) == int(total) > 0
        page.screenshot(path=str(shots / f"{name}-1-jobs.png"))
        page.click(f"{row} button.view")
        page.wait_for_selector("body[data-overlay-drawn='1']", timeout=60_000)
        elapsed = time.monotonic() - started
        print(
            f"\n{slide.name}: {total} tiles; hashed, uploaded and submitted {submitted:.2f} s, "
            f"succeeded seen {succeeded:.2f} s, overlay drawn {elapsed:.2f} s after the click"
        )
        assert page.inner_text("#mpp")  # mpp and its source are shown
        assert "attention" in page.inner_text("#colourbar-title")  # names what it colours
        page.wait_for_timeout(300)  # let the last animation frame settle

        osd = page.locator("#osd")
        page.evaluate("document.getElementById('opacity').value = 80")
        page.dispatch_event("#opacity", "input")
        page.screenshot(path=str(shots / f"{name}-2-result.png"))
        full = _pixels(osd.screenshot())
        page.evaluate("document.getElementById('opacity').value = 20")
        page.dispatch_event("#opacity", "input")
        faded = _pixels(osd.screenshot())
        page.uncheck("#show-tiles")
        page.uncheck("#show-outline")
        bare = _pixels(osd.screenshot())
        page.screenshot(path=str(shots / f"{name}-3-overlay-off.png"))

        geo = _geometry(page)
        centres = [
            (sum(p[0] for p in t[:4]) / 4, sum(p[1] for p in t[:4]) / 4) for t in geo["tiles"]
        ]
        assert centres
        for c in centres:
            on_diff = np.abs(_patch(full, c) - _patch(bare, c)).mean()
            faded_diff = np.abs(_patch(faded, c) - _patch(bare, c)).mean()
            assert on_diff > 25, (c, on_diff)  # the tile colour is drawn over the tissue
            assert faded_diff < on_diff  # and fades with the opacity slider
        for tile in geo["tiles"]:  # each coloured tile holds tissue (not only background)
            x0, y0 = (max(0, round(min(p[i] for p in tile))) for i in (0, 1))
            x1, y1 = (round(max(p[i] for p in tile)) for i in (0, 1))
            region = bare[y0:y1, x0:x1]
            assert (region.min(axis=2) < 220).mean() > 0.05, tile
        away = _away_from_overlay(geo)
        assert away, "no point of the slide lies away from the overlay"
        for p in away:
            assert np.abs(_patch(full, p, 1) - _patch(bare, p, 1)).max() <= 2, p
        assert not ui.errors, ui.errors
    finally:
        ui.close()


def test_a_failed_job_shows_its_code_and_sentence_and_retry_and_cancel_work(
    browser: Any, stack: tuple[str, Proc], shots: Path
) -> None:
    base, worker = stack
    ui = Page(browser, base)
    page = ui.page
    row = "#jobs-table tbody tr:first-child"
    try:
        ui.sign_in(API_KEY)
        page.wait_for_selector("#jobs-view:not([hidden])")
        page.click("#nav-new")
        page.check("input[name=source][value=path]")
        page.fill("#slide-path", NO_MPP.name)
        page.click("#submit-job")
        page.wait_for_selector(f"{row}[data-state=failed]", timeout=60_000)
        failed_id = page.get_attribute(row, "data-job-id")
        error = page.inner_text(f"{row} td.job-error")
        assert error.startswith("UNKNOWN_MPP: ") and "mpp" in error.split(": ", 1)[1]
        page.screenshot(path=str(shots / "failed-job.png"))
        page.click(f"{row} button.retry")  # the same request again: a new job
        deadline = time.monotonic() + 30
        while page.get_attribute(row, "data-job-id") == failed_id:
            assert time.monotonic() < deadline, "Retry submitted no new job"
            page.wait_for_timeout(100)
        page.wait_for_selector(f"{row}[data-state=failed]", timeout=60_000)

        worker.pause()  # the next job stays queued until it is canceled
        try:
            page.click("#nav-new")
            page.check("input[name=source][value=path]")
            page.fill("#slide-path", "OS-2-ndpi.ome.tif")
            page.click("#submit-job")
            page.wait_for_selector(f"{row}[data-state=queued]", timeout=30_000)
            page.click(f"{row} button.cancel")
            page.wait_for_selector(f"{row}[data-state=canceled]", timeout=30_000)
        finally:
            worker.resume()
        assert page.is_visible(f"{row} button.retry")
        assert not ui.errors, ui.errors
    finally:
        ui.close()
