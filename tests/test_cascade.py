"""The cascade (xmag.cascade): card section, region selection, sentences, and a run on a real
slide with a torch-free stand-in cell model whose outputs numpy can recompute."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.cascade_helpers import add_cascade, build_contract_graph, reference_outputs
from xmag.cascade import Cascade, CascadeOutcome
from xmag.cascade.select import select_regions
from xmag.cascade.sentences import build_sentences, neighbour_graph
from xmag.engine import Engine
from xmag.errors import ChecksumMismatchError, ModelPackageError
from xmag.package import (
    CARD_FILENAME,
    CASCADE_CHECKSUM_KEY,
    CascadeSpec,
    ModelCard,
    RegionSelection,
    SentenceSpec,
    load_package,
)
from xmag.readers import open_slide
from xmag.readers.base import SlideReader

SLIDE = "CMU-1-Small-Region.svs"  # 2220 x 2967 px at 0.499 um/px, one level


# -- the card ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cascade_package(default_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return add_cascade(default_package, tmp_path_factory.mktemp("casc") / "pkg", CascadeSpec(k=4))


def _edit_card(pkg: Path, tmp: Path, **cascade_changes: object) -> Path:
    out = tmp / "edited"
    shutil.copytree(pkg, out)
    raw = json.loads((out / CARD_FILENAME).read_text())
    raw["cascade"].update(cascade_changes)
    (out / CARD_FILENAME).write_text(json.dumps(raw))
    return out


def test_a_cascade_package_loads_and_its_section_is_part_of_the_model_identity(
    cascade_package: Path, default_package: Path
) -> None:
    pkg = load_package(cascade_package)
    assert pkg.card.cascade is not None and pkg.card.cascade.k == 4
    assert pkg.card.tasks == [*(h.name for h in pkg.card.heads), "recurrence_risk"]
    sums = pkg.checksums()
    assert {"celleconet.onnx", "vocabulary.json", CASCADE_CHECKSUM_KEY} <= set(sums)
    other = pkg.card.model_copy(update={"cascade": pkg.card.cascade.model_copy(update={"k": 8})})
    assert other.checksums()[CASCADE_CHECKSUM_KEY] != sums[CASCADE_CHECKSUM_KEY]
    assert CASCADE_CHECKSUM_KEY not in load_package(default_package).checksums()


def test_a_cascade_file_not_listed_with_its_checksum_is_refused(cascade_package: Path) -> None:
    raw = json.loads((cascade_package / CARD_FILENAME).read_text())
    raw["files"] = [f for f in raw["files"] if f["path"] != "vocabulary.json"]
    with pytest.raises(ValueError, match=r"vocabulary\.json"):
        ModelCard.model_validate(raw)


def test_a_changed_cell_model_fails_its_checksum(cascade_package: Path, tmp_path: Path) -> None:
    out = _edit_card(cascade_package, tmp_path)
    with open(out / "celleconet.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ChecksumMismatchError, match=r"celleconet\.onnx"):
        load_package(out)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"detector": {"min_area": 3.0}}, "unknown parameters"),
        ({"model": {"file": "celleconet.onnx", "risk": "hazard"}}, "hazard"),
        (
            {
                "model": {
                    "file": "celleconet.onnx",
                    "inputs": [
                        "w",
                        "types",
                        "xy_um",
                        "nbr_index",
                        "nbr_mask",
                        "cell_mask",
                        "region_mask",
                    ],
                }
            },
            "inputs",
        ),
        ({"sentences": {"k_neighbours": 4}}, "neighbours"),
    ],
)
def test_a_cascade_section_that_disagrees_with_its_files_is_refused_at_load(
    cascade_package: Path, tmp_path: Path, change: dict, message: str
) -> None:
    out = _edit_card(cascade_package, tmp_path, **change)
    with pytest.raises(ModelPackageError, match=message):
        load_package(out)


def test_a_vocabulary_that_is_not_a_codebook_is_refused(
    default_package: Path, tmp_path: Path
) -> None:
    out = add_cascade(default_package, tmp_path / "pkg")
    (out / "vocabulary.json").write_text(json.dumps({"format": "something/1"}))
    raw = json.loads((out / CARD_FILENAME).read_text())
    from xmag.package import sha256_file

    for f in raw["files"]:
        if f["path"] == "vocabulary.json":
            f["sha256"] = sha256_file(out / "vocabulary.json")
            f["size_bytes"] = (out / "vocabulary.json").stat().st_size
    (out / CARD_FILENAME).write_text(json.dumps(raw))
    with pytest.raises(ModelPackageError, match="not a cell vocabulary"):
        load_package(out)


def test_selection_rules_must_name_a_head_of_the_right_kind(default_package: Path) -> None:
    card = load_package(default_package).card
    tile = next(h.name for h in card.heads if h.level == "tile")
    slide = next(h.name for h in card.heads if h.level == "slide")
    base = card.model_dump()

    def with_select(**sel: object) -> dict:
        casc = CascadeSpec(select=RegionSelection(**sel)).model_dump()
        files = base["files"] + [
            {"path": p, "sha256": "0" * 64} for p in ("vocabulary.json", "celleconet.onnx")
        ]
        return {**base, "files": files, "cascade": casc}

    ModelCard.model_validate(with_select(rule="tile_head", head=tile))
    with pytest.raises(ValueError, match="needs a tile head"):
        ModelCard.model_validate(with_select(rule="tile_head", head=slide))
    with pytest.raises(ValueError, match="not a head"):
        ModelCard.model_validate(with_select(rule="slide_attention", head="nope"))
    with pytest.raises(ValueError, match="needs a head"):
        RegionSelection(rule="tile_head")


# -- selection --------------------------------------------------------------------------------
def test_regions_are_the_highest_values_without_overlap_and_inside_the_slide() -> None:
    xy = np.array([[0, 0], [100, 0], [200, 0], [0, 300], [900, 900]], np.int64)
    values = np.array([0.1, 0.9, 0.8, 0.5, 0.7])
    picked = select_regions(
        values,
        xy,
        np.arange(5) + 10,
        level0_tile=100,
        level0_side=150,
        dimensions=(1000, 1000),
        k=3,
    )
    # tile 2 (0.8) would overlap tile 1's field (fields 150 wide, tiles 100 apart): skipped
    assert [p.grid_index for p in picked] == [11, 14, 13]
    assert [p.rank for p in picked] == [1, 2, 3]
    assert [p.value for p in picked] == [0.9, 0.7, 0.5]
    x, y = picked[1].level0_xy  # centred on (950, 950), moved inside the slide
    assert (x, y) == (850, 850)


def test_tied_values_are_picked_spread_over_the_tissue_not_in_reading_order() -> None:
    xy = np.stack([np.arange(100) * 100, np.zeros(100)], 1).astype(np.int64)
    picked = select_regions(
        np.ones(100),
        xy,
        np.arange(100),
        level0_tile=100,
        level0_side=50,
        dimensions=(10_000, 100),
        k=4,
    )
    assert sorted(p.grid_index for p in picked) == [0, 25, 50, 75]


# -- sentences --------------------------------------------------------------------------------
def test_phrases_are_the_nearest_cells_within_the_radius() -> None:
    xy = np.array([[0, 0], [1, 0], [3, 0], [100, 0]], float)
    idx, ok = neighbour_graph(xy, 2, radius_um=5)
    assert idx[0].tolist() == [1, 2] and ok[0].all()
    assert idx[3].tolist() == [3, 3] and not ok[3].any()  # a lone cell gets no far neighbour


def test_sentences_tile_each_region_and_never_mix_two() -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 200, (300, 2))
    b = rng.uniform(0, 200, (300, 2)) + np.array([200, 0])  # an adjacent region
    xy = np.concatenate([a, b])
    spec = SentenceSpec(region_um=100, max_cells=40, min_cells=5, k_neighbours=3)
    s = build_sentences(xy, np.zeros(600, np.int64), spec, np.array([[0, 0, 200], [200, 0, 200]]))
    assert s.n_regions == 8 and np.allclose(s.side_um, 100)
    for r in range(s.n_regions):
        cells = s.cell_index[r][s.cell_mask[r]]
        assert len(cells) == 40  # ~75 cells per square, subsampled
        assert len({int(c >= 300) for c in cells}) == 1
        assert np.abs(s.xy_um[r][s.cell_mask[r]]).max() <= 50
    few = build_sentences(xy[:3], np.zeros(3, np.int64), spec, np.array([[0, 0, 200]]))
    assert few.n_regions == 0


# -- a run on a real slide ---------------------------------------------------------------------
class CountingReader:
    """Wraps a reader and records every region read."""

    def __init__(self, inner: SlideReader) -> None:
        self.inner = inner
        self.reads: list[tuple[tuple[int, int], int, tuple[int, int]]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def read_region(
        self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        self.reads.append((tuple(level0_xy), level, tuple(size)))
        return self.inner.read_region(level0_xy, level, size)


Ran = tuple[CascadeOutcome, CountingReader, Path]


@pytest.fixture(scope="module")
def ran(cascade_package: Path, slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Ran:
    pkg = load_package(cascade_package)
    engine = Engine(pkg)
    out_dir = tmp_path_factory.mktemp("cascade-out")
    with engine.prepare_slide(slides_dir / SLIDE) as prepared:
        run = engine.run_pipeline(prepared.reader, prepared.plan)
        heads = engine.run_heads(run.embeddings)
    with open_slide(slides_dir / SLIDE) as reader:
        counting = CountingReader(reader)
        outcome = Cascade(pkg).run_on_reader(
            counting,  # type: ignore[arg-type]  # a stand-in reader
            prepared.plan,
            run.level0_xy,
            run.grid_index,
            heads,
            out_dir,
        )
    return outcome, counting, out_dir


def test_only_the_picked_regions_are_read_at_cell_resolution(ran: Ran) -> None:
    outcome, reader, _ = ran
    res = outcome.result
    assert 1 <= len(res.regions) <= 4 and res.cells > 100
    side = 512  # 256 um at 0.5 um/px; the 0.499 um/px level is within 2%: read as is
    assert {r.level0_box[2:] for r in res.regions} == {(side, side)}
    # one read per region, each the region itself (the level-0 level of a one-level slide)
    assert sorted(r[0] for r in reader.reads) == sorted(r.level0_box[:2] for r in res.regions)
    assert {r[2] for r in reader.reads} == {(512, 512)}
    assert res.level.level == 0 and res.read_mpp == pytest.approx(0.499)
    assert sum(r.cells for r in res.regions) == res.cells
    assert [r.rank for r in res.regions] == list(range(1, len(res.regions) + 1))
    assert all(a.value >= b.value for a, b in zip(res.regions, res.regions[1:], strict=False))


def test_the_risk_is_the_model_on_the_cells_words_in_their_sentences(ran: Ran) -> None:
    outcome, _, _ = ran
    inputs = outcome.sentences.model_inputs(outcome.words)
    ref = reference_outputs(inputs)
    assert outcome.result.risk == pytest.approx(float(ref["risk"][0]), abs=1e-5)
    assert outcome.result.probability == pytest.approx(float(ref["p5y"][0]), abs=1e-5)
    np.testing.assert_allclose(outcome.region_attention, ref["region_attention"][0], atol=1e-6)
    pred = outcome.prediction
    assert pred is not None and pred.name == "recurrence_risk"
    assert pred.probabilities["recurrence_within_5y"] == pytest.approx(outcome.result.probability)
    # every cell in a sentence has an attention; they sum to 1 per sentence and slide
    inside = np.isfinite(outcome.cell_attention)
    assert inside.sum() == outcome.result.cells_in_sentences
    assert np.nansum(outcome.slide_attention) == pytest.approx(1.0, abs=1e-4)


def test_cells_geojson_places_every_cell_in_its_region_in_level0_pixels(ran: Ran) -> None:
    outcome, _, out_dir = ran
    assert outcome.artifacts == {"cells": "cells.geojson", "cascade_heatmap": "cascade_heatmap.png"}
    doc = json.loads((out_dir / "cells.geojson").read_text())
    feats = doc["features"]
    assert doc["type"] == "FeatureCollection" and len(feats) == outcome.result.cells
    boxes = {r.rank: r.level0_box for r in outcome.result.regions}
    with_attention = 0
    for f in feats:
        m = f["properties"]["measurements"]
        x, y, w, h = boxes[m["CellEcoNet: region rank"]]
        ring = np.asarray(f["geometry"]["coordinates"][0])
        cx, cy = ring.mean(0)
        assert x - 1 <= cx <= x + w + 1 and y - 1 <= cy <= y + h + 1
        assert 0 <= m["CellEcoNet: word"] < 12 and "area_um2" in m
        with_attention += "CellEcoNet: slide attention" in m
    assert with_attention == outcome.result.cells_in_sentences
    assert (out_dir / "cascade_heatmap.png").stat().st_size > 1000


def test_a_stand_in_model_with_other_output_names_is_read_by_the_card(
    default_package: Path, tmp_path: Path, slides_dir: Path
) -> None:
    graph = build_contract_graph()
    for out in graph.graph.output:
        if out.name == "p5y":
            out.name = "prob"
    for node in graph.graph.node:
        node.output[:] = ["prob" if o == "p5y" else o for o in node.output]
    spec = CascadeSpec(k=3, model={"probability": "prob"}, select={"rule": "tissue"})
    pkg = load_package(add_cascade(default_package, tmp_path / "pkg", spec, graph))
    engine = Engine(pkg)
    with engine.prepare_slide(slides_dir / SLIDE) as prepared:
        run = engine.run_pipeline(prepared.reader, prepared.plan)
        heads = engine.run_heads(run.embeddings)
    outcome = Cascade(pkg).run(
        slides_dir / SLIDE, prepared.plan, run.level0_xy, run.grid_index, heads
    )
    assert len(outcome.result.regions) == 3 and outcome.result.probability is not None
    assert outcome.result.rule == "tissue" and outcome.artifacts == {}


# -- through the engine and the CLI -----------------------------------------------------------
def test_xmag_embed_with_a_cascade_package_writes_risk_regions_and_cells(
    cascade_package: Path, slides_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import jsonschema_rs
    from typer.testing import CliRunner

    from xmag.cli import build_app
    from xmag.results import EmbedReport

    monkeypatch.setenv("XMAG_PROVIDERS", "cpu")
    argv = ["embed", str(slides_dir / SLIDE), "--model", str(cascade_package), "--json"]
    argv += ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(build_app(), argv)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    docs = Path(__file__).resolve().parents[1] / "docs"
    schema = json.loads((docs / "embed.schema.json").read_text())
    jsonschema_rs.validator_for(schema).validate(data)
    result = EmbedReport.model_validate(data).outcomes[0].result
    assert result is not None and result.cascade is not None
    casc = result.cascade
    assert casc.risk is not None and 0 < (casc.probability or 0) < 1
    assert casc.k == 4 and 1 <= len(casc.regions) <= 4 and "cascade" in result.timings
    risk = [p for p in result.predictions if p.name == "recurrence_risk"]
    assert len(risk) == 1 and risk[0].kind == "celleconet"
    assert risk[0].probabilities["recurrence_within_5y"] == pytest.approx(casc.probability)
    assert result.artifacts.cells == "cells.geojson"
    folder = tmp_path / "out" / Path(SLIDE).stem
    written = {p.name for p in folder.iterdir()}
    assert {"cells.geojson", "cascade_heatmap.png", "result.json", "heatmap.png"} <= written
    cells = json.loads((folder / "cells.geojson").read_text())["features"]
    assert len(cells) == casc.cells
    stored = json.loads((folder / "result.json").read_text())
    assert stored["cascade"]["regions"][0]["level0_box"] == list(casc.regions[0].level0_box)
    # the key names the cascade: the same slide under K = 8 is another result
    from xmag.engine import Engine

    pkg = load_package(cascade_package)
    other = pkg.card.model_copy(update={"cascade": pkg.card.cascade.model_copy(update={"k": 8})})
    assert (
        Engine(pkg).identity("0" * 64).key()
        != Engine(type(pkg)(pkg.root, other)).identity("0" * 64).key()
    )


@pytest.mark.parametrize("rule", ["tile_head", "slide_attention"])
def test_regions_picked_by_a_head_record_that_heads_value_for_their_tile(
    default_package: Path, tmp_path: Path, slides_dir: Path, rule: str
) -> None:
    card = load_package(default_package).card
    level = "tile" if rule == "tile_head" else "slide"
    head = next(h for h in card.heads if h.level == level)
    spec = CascadeSpec(k=2, select=RegionSelection(rule=rule, head=head.name))  # type: ignore[arg-type]
    pkg = load_package(add_cascade(default_package, tmp_path / "pkg", spec))
    engine = Engine(pkg)
    with engine.prepare_slide(slides_dir / SLIDE) as prepared:
        run = engine.run_pipeline(prepared.reader, prepared.plan)
        heads = engine.run_heads(run.embeddings)
    out = Cascade(pkg).run(slides_dir / SLIDE, prepared.plan, run.level0_xy, run.grid_index, heads)
    if rule == "tile_head":
        per_tile = heads.tile_probs[head.name][:, -1]
        assert out.result.rule == f"tile_head:{head.name}:{head.labels[-1]}"
    else:
        per_tile = heads.attention[head.name]
        assert out.result.rule == f"slide_attention:{head.name}"
    row = {int(g): i for i, g in enumerate(run.grid_index)}
    for region in out.result.regions:
        assert region.value == pytest.approx(float(per_tile[row[region.grid_index]]))
    assert out.result.regions[0].value == pytest.approx(float(per_tile.max()))
