"""``xmag embed`` and ``xmag inspect`` through typer's CliRunner, and plugin loading."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema_rs
import pytest
import typer
from typer.testing import CliRunner

from xmag.cli import build_app, expand_slides, load_plugins
from xmag.results import EmbedReport, InspectReport

DOCS = Path(__file__).resolve().parents[1] / "docs"
CMU = "CMU-1-Small-Region.svs"
OME_IHC = "OS-2-ndpi.ome.tif"
TCGA = "tcga-cr-7395-01a-01-ts1.svs"


@pytest.fixture(scope="module")
def model_dir(default_package: Path) -> Path:
    return default_package


@pytest.fixture(autouse=True)
def _cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XMAG_PROVIDERS", "cpu")
    monkeypatch.setenv("XMAG_READER_WORKERS", "2")


def _embed(model_dir: Path, tmp_path: Path, *args: str) -> object:
    argv = ["embed", *args, "--model", str(model_dir), "--out", str(tmp_path / "out")]
    argv += ["--cache-dir", str(tmp_path / "cache")]
    return CliRunner().invoke(build_app(), argv)


def _schema(name: str) -> jsonschema_rs.Validator:
    return jsonschema_rs.validator_for(json.loads((DOCS / name).read_text()))


def test_a_failing_slide_among_good_ones_fails_alone_with_its_code(
    model_dir: Path, slides_dir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not a slide\n")
    res = _embed(model_dir, tmp_path, str(slides_dir / CMU), str(bad), str(slides_dir / OME_IHC))
    assert res.exit_code == 1, res.output
    assert "UNSUPPORTED_FORMAT" in res.output
    assert "notes.txt" in res.output
    for name in ("CMU-1-Small-Region", "OS-2-ndpi"):
        folder = tmp_path / "out" / name
        assert sorted(p.name for p in folder.iterdir()) == [
            "features.h5",
            "heatmap.png",
            "result.json",
            "tiles.geojson",
        ]
    assert not (tmp_path / "out" / "notes").exists()


def test_json_output_matches_the_published_schema_and_keeps_the_order(
    model_dir: Path, slides_dir: Path, tmp_path: Path
) -> None:
    res = _embed(model_dir, tmp_path, str(slides_dir / TCGA), str(slides_dir / CMU), "--json")
    assert res.exit_code == 1
    data = json.loads(res.stdout)
    _schema("embed.schema.json").validate(data)
    report = EmbedReport.model_validate(data)
    assert [o.ok for o in report.outcomes] == [False, True]
    assert report.outcomes[0].error is not None
    assert report.outcomes[0].error.code == "UNKNOWN_MPP"
    result = report.outcomes[1].result
    assert result is not None and result.tiles.kept > 0
    _schema("result.schema.json").validate(data["outcomes"][1]["result"])


def test_every_slide_succeeding_exits_zero_and_default_mpp_reaches_the_engine(
    model_dir: Path, slides_dir: Path, tmp_path: Path
) -> None:
    res = _embed(model_dir, tmp_path, str(slides_dir / TCGA), "--default-mpp", "0.25", "--json")
    assert res.exit_code == 0, res.output
    (outcome,) = EmbedReport.model_validate_json(res.stdout).outcomes
    assert outcome.result is not None
    assert outcome.result.mpp.source == "default"


def test_the_untrained_default_model_is_warned_about(
    model_dir: Path, slides_dir: Path, tmp_path: Path
) -> None:
    res = _embed(model_dir, tmp_path, str(slides_dir / OME_IHC))
    assert res.exit_code == 0, res.output
    assert "untrained" in res.stderr and "trained=false" in res.stderr


def test_a_glob_expands_to_every_matching_slide(
    model_dir: Path, slides_dir: Path, tmp_path: Path
) -> None:
    res = _embed(model_dir, tmp_path, str(slides_dir / "*.svs"), "--json", "--default-mpp", "0.25")
    assert res.exit_code == 0, res.output
    report = EmbedReport.model_validate_json(res.stdout)
    assert [Path(o.slide).name for o in report.outcomes] == [CMU, TCGA]


def test_a_glob_matching_nothing_is_a_failure_not_a_silent_success(tmp_path: Path) -> None:
    assert expand_slides([str(tmp_path / "*.svs")]) == [(str(tmp_path / "*.svs"), None)]


def test_a_second_embed_is_served_from_the_cache_and_no_cache_recomputes(
    model_dir: Path, slides_dir: Path, tmp_path: Path
) -> None:
    first = _embed(model_dir, tmp_path, str(slides_dir / OME_IHC), "--json")
    second = _embed(model_dir, tmp_path, str(slides_dir / OME_IHC), "--json")
    forced = _embed(model_dir, tmp_path, str(slides_dir / OME_IHC), "--json", "--no-cache")
    hits = [
        EmbedReport.model_validate_json(r.stdout).outcomes[0].result.cache_hit  # type: ignore[union-attr]
        for r in (first, second, forced)
    ]
    assert hits == [False, True, False]


def test_a_model_folder_that_does_not_load_exits_2_with_its_code(
    slides_dir: Path, tmp_path: Path
) -> None:
    res = CliRunner().invoke(
        build_app(), ["embed", str(slides_dir / CMU), "--model", str(tmp_path), "--no-cache"]
    )
    assert res.exit_code == 2
    assert "MODEL_PACKAGE_INVALID" in res.output


def test_inspect_json_shows_what_the_core_sees(slides_dir: Path) -> None:
    res = CliRunner().invoke(build_app(), ["inspect", str(slides_dir / CMU), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    _schema("inspect.schema.json").validate(data)
    report = InspectReport.model_validate(data)
    assert report.ok and report.error is None
    assert (report.reader, report.format) == ("openslide", "svs")
    assert report.mpp is not None and report.mpp.source == "metadata"
    assert report.tiles is not None and 0 < report.tiles.kept <= report.tiles.total
    assert report.qc is not None and report.qc.tiles_kept == report.tiles.kept
    assert report.level is not None and report.level.level == 0


def test_inspect_reports_the_typed_error_and_exits_1(slides_dir: Path) -> None:
    res = CliRunner().invoke(build_app(), ["inspect", str(slides_dir / TCGA), "--json"])
    assert res.exit_code == 1
    report = InspectReport.model_validate_json(res.stdout)
    assert not report.ok
    assert report.error is not None and report.error.code == "UNKNOWN_MPP"
    assert report.reader == "openslide"  # what was seen before the failure is kept
    ok = CliRunner().invoke(build_app(), ["inspect", str(slides_dir / TCGA), "--mpp", "0.25"])
    assert ok.exit_code == 0, ok.output
    assert "override" in ok.stdout


def test_plugins_register_commands_and_a_missing_plugin_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dist = tmp_path / "xmag_fake_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: xmag-fake-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[xmag.fake_commands]\n"
        "hello = xmag_fake_hello:register\n"
        "absent = xmag_fake_absent_package.cli:register\n"
    )
    (tmp_path / "xmag_fake_hello.py").write_text(
        "import typer\n"
        "def register(app: typer.Typer) -> None:\n"
        "    @app.command('hello')\n"
        "    def hello() -> None:\n"
        "        typer.echo('hello from a plugin')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    app = build_app()
    assert load_plugins(app, group="xmag.fake_commands") == ["hello"]
    res = CliRunner().invoke(app, ["hello"])
    assert res.exit_code == 0 and "hello from a plugin" in res.stdout
    sys.modules.pop("xmag_fake_hello", None)


def test_the_core_app_builds_without_plugins() -> None:
    app = build_app()
    assert isinstance(app, typer.Typer)
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    assert "embed" in res.stdout and "inspect" in res.stdout
