"""CellEcoNet parts one by one: Cox loss, codebook, phrases, sentences, model masks, folds, I/O."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from tests.torch_required import require_torch

torch = require_torch()

from training.celleconet.config import (  # noqa: E402
    ContextModelConfig,
    SentenceConfig,
    Ties,
    VocabConfig,
)
from training.celleconet.cv import patient_folds  # noqa: E402
from training.celleconet.io import (  # noqa: E402
    load_cell_table,
    load_slide_cells,
    read_labels,
    save_cell_table,
)
from training.celleconet.losses import cox_loss, horizon_targets  # noqa: E402
from training.celleconet.metrics import (  # noqa: E402
    concordance,
    group_survival,
    plot_kaplan_meier,
    time_dependent_auc,
)
from training.celleconet.model import CellEcoNet  # noqa: E402
from training.celleconet.phrases import neighbour_graph  # noqa: E402
from training.celleconet.sentences import build_sentences, stack_slides  # noqa: E402
from training.celleconet.train import MODEL_INPUTS, to_tensors  # noqa: E402
from training.celleconet.vocab import Codebook, fit_codebook  # noqa: E402
from xmag.cells.table import FEATURE_NAMES, CellTable  # noqa: E402

F = len(FEATURE_NAMES)


def _table(xy: np.ndarray, feats: np.ndarray | None = None, types: np.ndarray | None = None):
    n = len(xy)
    rng = np.random.default_rng(0)
    return CellTable(
        xy_um=xy,
        features=rng.normal(size=(n, F)) if feats is None else feats,
        types=np.ones(n, np.int8) if types is None else types,
        contours_px=[np.array([[0, 0], [1, 0], [1, 1]], np.float32) + p / 0.5 for p in xy],
        mpp=0.5,
        source="test",
    )


# -- Cox loss --------------------------------------------------------------------------------------
def _tied_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=60)
    t = np.ceil(rng.exponential(1 / np.exp(0.8 * x)) * 4) / 4  # quarter-years: many ties
    e = (rng.random(60) < 0.75).astype(int)
    return x, t, e


def _fit_beta(x: np.ndarray, t: np.ndarray, e: np.ndarray, ties: Ties) -> float:
    beta = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    xt, tt, et = (torch.as_tensor(v, dtype=torch.float64) for v in (x, t, e))
    opt = torch.optim.LBFGS([beta], lr=1, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = cox_loss(xt * beta, tt, et, ties)
        loss.backward()
        return loss

    opt.step(closure)
    return beta.item()


def test_the_efron_cox_loss_gives_the_coefficient_lifelines_finds_on_tied_times() -> None:
    import pandas as pd
    from lifelines import CoxPHFitter

    x, t, e = _tied_data()
    assert len(np.unique(t[e == 1])) < (e == 1).sum()  # the data really has tied events
    ref = CoxPHFitter().fit(pd.DataFrame({"t": t, "e": e, "x": x}), "t", "e").params_["x"]
    assert _fit_beta(x, t, e, Ties.EFRON) == pytest.approx(ref, abs=1e-4)


def test_breslow_differs_from_efron_with_ties_and_equals_it_without() -> None:
    x, t, e = _tied_data()
    r = torch.as_tensor(0.5 * x)
    tt, et = torch.as_tensor(t), torch.as_tensor(e)
    assert float(cox_loss(r, tt, et, "breslow")) != pytest.approx(float(cox_loss(r, tt, et)))
    t_distinct = torch.as_tensor(t + np.arange(len(t)) * 1e-6)
    assert float(cox_loss(r, t_distinct, et, "breslow")) == pytest.approx(
        float(cox_loss(r, t_distinct, et, "efron"))
    )


def test_the_cox_loss_is_zero_without_events_and_prefers_the_right_order() -> None:
    t = torch.tensor([1.0, 2.0, 3.0])
    assert float(cox_loss(torch.tensor([3.0, 2.0, 1.0]), t, torch.zeros(3))) == 0.0
    e = torch.ones(3)
    assert cox_loss(torch.tensor([3.0, 2.0, 1.0]), t, e) < cox_loss(torch.tensor([1.0, 2, 3]), t, e)


def test_horizon_targets_leave_out_patients_censored_before_the_horizon() -> None:
    target, weight = horizon_targets(np.array([2.0, 3.0, 7.0, 6.0]), np.array([1, 0, 1, 0]), 5.0)
    assert target.tolist() == [1, 0, 0, 0]
    assert weight.tolist() == [1, 0, 1, 1]


# -- codebook, phrases, sentences ------------------------------------------------------------------
def test_the_codebook_separates_two_kinds_of_cell_and_survives_json(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    small = rng.normal(0, 0.3, size=(200, F))
    big = rng.normal(0, 0.3, size=(200, F))
    big[:, 0] += 10.0  # area_um2
    cfg = VocabConfig(n_words=2, by_type=False, features=("area_um2", "eccentricity"))
    book = fit_codebook([small, big], cfg)
    w_small, w_big = book.assign(small), book.assign(big)
    assert len(set(w_small)) == 1 and len(set(w_big)) == 1 and w_small[0] != w_big[0]
    again = Codebook.load(book.save(tmp_path / "codebook.json"))
    np.testing.assert_array_equal(again.assign(big), w_big)
    nan_cell = small[:1].copy()
    nan_cell[0, 0] = np.nan  # unmeasured area: read as the mean, never an error
    assert again.assign(nan_cell).shape == (1,)


def test_a_by_type_codebook_never_gives_two_types_the_same_word(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(300, F))  # same morphology for both types
    t = np.repeat([1, 2], 150)
    book = fit_codebook(x, VocabConfig(n_words=3), t)
    assert book.n_words == 6 and book.word_types.tolist() == [1, 1, 1, 2, 2, 2]
    w = Codebook.load(book.save(tmp_path / "cb.json")).assign(x, t)
    assert set(w[t == 1]) <= {0, 1, 2} and set(w[t == 2]) <= {3, 4, 5}
    assert book.assign(x[:5], np.full(5, 3)).max() < 6  # an unseen type: any word
    with pytest.raises(ValueError, match="types"):
        book.assign(x)


def test_the_codebook_refuses_fewer_cells_than_words() -> None:
    with pytest.raises(ValueError, match="cannot fit"):
        fit_codebook(np.zeros((3, F)), VocabConfig(n_words=4, by_type=False))


def test_phrases_keep_the_k_nearest_within_the_radius_and_never_the_cell_itself() -> None:
    xy = np.array([[0, 0], [5, 0], [0, 6], [100, 100]], float)
    idx, ok = neighbour_graph(xy, k=2, radius_um=10.0)
    assert idx[0].tolist() == [1, 2] and ok[0].all()
    assert not ok[3].any() and (idx[3] == 3).all()  # a lone cell: padded with itself, masked
    assert idx[1, 0] == 0 and ok[1, 0] and ok[1, 1]  # 0 at 5 um, 2 at 7.8 um: both within 10


def test_sentences_cut_regions_cap_cells_and_index_neighbours_locally() -> None:
    rng = np.random.default_rng(2)
    dense = rng.uniform(0, 100, size=(90, 2))  # region (0, 0): more cells than slots
    sparse = rng.uniform(0, 100, size=(5, 2)) + np.array([100, 0])  # too few: dropped
    other = rng.uniform(0, 100, size=(20, 2)) + np.array([0, 100])
    table = _table(np.concatenate([dense, sparse, other]))
    s = build_sentences(table, SentenceConfig(region_um=100, max_cells=64, min_cells=8))
    assert s.n_regions == 2
    assert s.cell_mask.sum(1).tolist() == [64, 20]
    assert (s.cell_index[0][s.cell_mask[0]] < 90).all()
    assert np.abs(s.xy_um[s.cell_mask]).max() <= 50.0  # relative to the region centre
    assert (s.nbr_index[1][s.cell_mask[1]] < 20).all()  # slots of the same region
    with pytest.raises(ValueError, match="min_cells"):
        build_sentences(_table(sparse), SentenceConfig(min_cells=8))


# -- the model -------------------------------------------------------------------------------------
def _batch(n_slides: int = 3, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    slides, words = [], []
    for i in range(n_slides):
        xy = rng.uniform(0, 200, size=(150 + 20 * i, 2))
        t = _table(xy, types=rng.integers(0, 4, len(xy)).astype(np.int8))
        slides.append(build_sentences(t, SentenceConfig(max_cells=32, min_cells=4)))
        words.append(rng.integers(0, 8, len(xy)))
    return stack_slides(slides, words)


def _model() -> CellEcoNet:
    torch.manual_seed(0)
    return CellEcoNet(8, ContextModelConfig(dim=16, heads=2, layers=1)).eval()


def test_the_model_gives_risk_probability_and_attention_that_sums_to_one() -> None:
    arrays = _batch()
    risk, prob, region_attn, cell_attn = _model()(*to_tensors(arrays).values())
    b, r, m = arrays["words"].shape
    assert risk.shape == prob.shape == (b,)
    assert ((prob > 0) & (prob < 1)).all()
    assert region_attn.shape == (b, r) and cell_attn.shape == (b, r, m)
    np.testing.assert_allclose(region_attn.sum(1).detach(), 1.0, atol=1e-5)
    valid = torch.as_tensor(arrays["region_mask"])
    np.testing.assert_allclose(cell_attn.sum(2)[valid].detach(), 1.0, atol=1e-5)
    assert (cell_attn[~torch.as_tensor(arrays["cell_mask"])] == 0).all()


def test_padding_regions_and_cells_does_not_change_a_slide_risk() -> None:
    arrays = _batch()
    model = _model()
    base = model(*to_tensors(arrays).values())[0]
    padded = {}
    for k in MODEL_INPUTS:  # one more (empty) region and 5 more (empty) cell slots
        v = arrays[k]
        pad = [(0, 0), (0, 1)] + ([(0, 5)] if v.ndim > 2 else []) + [(0, 0)] * (v.ndim - 3)
        padded[k] = np.pad(v, pad)
    again = model(*to_tensors(padded).values())[0]
    np.testing.assert_allclose(again.detach(), base.detach(), atol=1e-5)


def test_a_hidden_cell_cannot_see_its_own_word_through_its_neighbours_phrases() -> None:
    arrays = _batch(1)
    model = _model()
    x = to_tensors(arrays)
    hide = torch.zeros_like(x["cell_mask"])
    hide[0, 0, 0] = True
    out = model.forward_train(**x, hide=hide)["mlm_logits"][0, 0, 0]
    x["words"][0, 0, 0] = (x["words"][0, 0, 0] + 3) % 8
    x["types"][0, 0, 0] = (x["types"][0, 0, 0] + 1) % 4
    again = model.forward_train(**x, hide=hide)["mlm_logits"][0, 0, 0]
    np.testing.assert_allclose(again.detach(), out.detach(), atol=1e-6)
    hide[0, 0, 0] = False  # shown: its word does reach the output
    assert not torch.allclose(model.forward_train(**x, hide=hide)["mlm_logits"][0, 0, 0], again)


def test_the_context_model_reads_positions_a_bag_of_words_would_not() -> None:
    arrays = _batch(1)
    model = _model()
    x = to_tensors(arrays)
    base = model(*x.values())[0]
    x["xy_um"] = x["xy_um"] * 0.5  # same words, cells moved closer together
    assert not torch.allclose(model(*x.values())[0], base)


# -- folds, labels, files, statistics --------------------------------------------------------------
def test_folds_never_split_a_patient_and_test_every_slide_once() -> None:
    patients = [f"P{i // 2}" for i in range(40)]  # two slides per patient
    event = np.array([i // 2 % 3 == 0 for i in range(40)], int)
    folds = patient_folds(patients, event, 4, seed=0)
    tested = np.concatenate([te for _, te in folds])
    assert sorted(tested.tolist()) == list(range(40))
    for train, test in folds:
        assert not {patients[i] for i in train} & {patients[i] for i in test}
        assert event[test].sum() >= 1  # stratified: every fold has events


def test_labels_are_read_with_subgroups_and_bad_rows_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "labels.csv"
    p.write_text("patient,slide,time,event,stage\nP1,S1,3.5,1,I\nP1,S2,3.5,1,II\n")
    rows = read_labels(p)
    assert rows[1].subgroups == {"stage": "II"} and rows[0].time == 3.5
    p.write_text("patient,slide,time,event\nP1,S1,3.5,2\n")
    with pytest.raises(ValueError, match="event must be 0 or 1"):
        read_labels(p)
    p.write_text("patient,slide,event\nP1,S1,1\n")
    with pytest.raises(ValueError, match="time"):
        read_labels(p)


def test_a_cell_table_survives_the_npz_round_trip(tmp_path: Path) -> None:
    table = _table(np.random.default_rng(4).uniform(0, 50, size=(7, 2)))
    path = save_cell_table(table, tmp_path / "S1" / "cells.npz", level0_mpp=0.25)
    again, l0 = load_cell_table(path)
    assert l0 == 0.25 and again.source == "test" and again.mpp == table.mpp
    np.testing.assert_array_equal(again.features, table.features)
    for a, b in zip(again.contours_px, table.contours_px, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(load_slide_cells(tmp_path / "S1")) == 7
    with pytest.raises(FileNotFoundError, match="no cell files"):
        load_slide_cells(tmp_path)


def test_survival_statistics_come_out_right_on_an_obvious_case(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    high = np.arange(80) < 40
    time = np.where(high, rng.exponential(2, 80), rng.exponential(12, 80))
    event = (rng.random(80) < 0.8).astype(int)
    risk = high + rng.normal(0, 0.1, 80)
    assert concordance(time, event, risk) > 0.7
    assert concordance(time, event, -risk) < 0.3
    g = group_survival(time, event, high)
    assert g["hr"] > 2 and g["hr_ci95"][0] > 1 and g["logrank_p"] < 1e-3
    auc, why = time_dependent_auc(time, event, risk, 5.0)
    assert why is None and auc > 0.7
    png = plot_kaplan_meier(time, event, high, tmp_path / "km.png", "test", 5.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cli_lists_the_celleconet_commands() -> None:
    from typer.testing import CliRunner

    from training.cli import app

    out = CliRunner().invoke(app, ["celleconet", "--help"])
    assert out.exit_code == 0
    for cmd in ("planted", "vocab", "cv"):
        assert cmd in out.output


def test_labels_written_by_hand_match_the_columns_the_reader_needs(tmp_path: Path) -> None:
    p = tmp_path / "l.csv"
    with p.open("w", newline="") as fh:
        csv.writer(fh).writerows([["patient", "slide", "time", "event"], ["A", "S", "0", "1"]])
    with pytest.raises(ValueError, match="time must be > 0"):
        read_labels(p)


def test_every_exported_name_of_the_package_resolves() -> None:
    import training.celleconet as pkg

    for name in pkg.__all__:
        assert getattr(pkg, name) is not None
    with pytest.raises(AttributeError):
        _ = pkg.not_a_name


def test_no_hazard_ratio_is_reported_when_a_group_has_no_event() -> None:
    time = np.arange(1.0, 13.0)
    high = np.arange(12) < 6
    event = high.astype(int)  # only the high group recurs
    g = group_survival(time, event, high)
    assert g["hr"] is None and g["logrank_p"] is not None
    assert any("not estimable" in w for w in g["warnings"])


def test_the_cli_builds_a_cohort_and_writes_a_full_report(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from training.cli import app

    consep = Path(__file__).parent / "data" / "nuclei" / "consep"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"train": {"epochs": 1, "pretrain_steps": 2, "folds": 2}}))
    run = CliRunner().invoke
    planted = ["celleconet", "planted", "--out", str(tmp_path / "c"), "--consep", str(consep)]
    out = run(app, [*planted, "--slides", "8", "--signal", "arrangement"])
    assert out.exit_code == 0, out.output
    cells, labels = tmp_path / "c" / "cells", tmp_path / "c" / "labels.csv"
    out = run(
        app, ["celleconet", "vocab", "--cells", str(cells), "--out", str(tmp_path / "cb.json")]
    )
    assert out.exit_code == 0, out.output
    assert Codebook.load(tmp_path / "cb.json").n_words == 12  # 4 words x 3 types
    report = tmp_path / "r"
    args = ["--cells", str(cells), "--labels", str(labels), "--out", str(report)]
    out = run(app, ["celleconet", "cv", *args, "--config", str(cfg)])
    assert out.exit_code == 0, out.output
    data = json.loads((report / "report.json").read_text())
    assert set(data["methods"]) == {"celleconet", "bag_of_cells", "abmil_region_means"}
    pooled = data["methods"]["celleconet"]["pooled"]
    assert 0.0 <= pooled["c_index"] <= 1.0 and pooled["n"] == 8
    assert "stage=I" in data["methods"]["celleconet"]["subgroups"]
    md = (report / "report.md").read_text()
    assert "stand-in for ABMIL on 5x tile embeddings" in md and "km_celleconet.png" in md
    assert (report / "km_bag_of_cells.png").read_bytes()[:4] == b"\x89PNG"
