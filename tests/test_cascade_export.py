"""CellEcoNet export (model_export.celleconet_export): the model engineer's CellEcoNet to ONNX,
parity with PyTorch on shapes other than the export example, a cascade package that loads, and
the serving side's words and phrases equal to training's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.torch_required import require_torch

torch = require_torch()

from model_export.celleconet_export import (  # noqa: E402
    CELL_MODEL_OUTPUTS,
    build_cascade_package,
    example_inputs,
    onnx_outputs,
    run_cell_parity,
)
from tests.cascade_helpers import random_vocabulary  # noqa: E402
from training.celleconet.config import ContextModelConfig, VocabConfig  # noqa: E402
from training.celleconet.model import CellEcoNet  # noqa: E402
from xmag.cascade import Cascade  # noqa: E402
from xmag.cascade.sentences import neighbour_graph  # noqa: E402
from xmag.cascade.vocabulary import Vocabulary  # noqa: E402
from xmag.engine import Engine  # noqa: E402
from xmag.package import CascadeSpec, load_package  # noqa: E402

N_WORDS = 12


@pytest.fixture(scope="module")
def model() -> CellEcoNet:
    torch.manual_seed(0)
    m = CellEcoNet(N_WORDS, ContextModelConfig(dim=8, heads=2, layers=1, n_frequencies=4))
    return m.eval()


@pytest.fixture(scope="module")
def package(model: CellEcoNet, default_package: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("export") / "pkg"
    return build_cascade_package(
        default_package,
        out,
        model=model,
        vocabulary=random_vocabulary(),
        cascade=CascadeSpec(k=2),
        name="celleconet-test",
        version="0",
        description="test",
        trained=False,
    )


def test_the_exported_graph_matches_pytorch_on_new_shapes(model: CellEcoNet, package: Path) -> None:
    parity = run_cell_parity(model, package / "celleconet.onnx", n_words=N_WORDS, k=6)
    assert parity.ok, parity.max_abs
    assert (package / "parity_cells.json").is_file()


def test_padding_regions_and_cells_does_not_change_the_onnx_risk(package: Path) -> None:
    ex = example_inputs(N_WORDS, b=1, r=3, m=6, pad=False)
    base = onnx_outputs(package / "celleconet.onnx", ex)
    padded = {
        k: np.concatenate([v, np.zeros_like(v[:, :2])], axis=1) for k, v in ex.items()
    }  # two more (masked) regions
    padded["region_mask"][:, 3:] = False
    more = onnx_outputs(package / "celleconet.onnx", padded)
    assert set(more) == set(CELL_MODEL_OUTPUTS)
    np.testing.assert_allclose(more["risk"], base["risk"], atol=1e-5)
    np.testing.assert_allclose(more["region_attention"][:, 3:], 0.0, atol=1e-7)


def test_the_package_loads_and_serves_a_slide_with_the_exported_model(
    model: CellEcoNet, package: Path, slides_dir: Path
) -> None:
    pkg = load_package(package)
    assert pkg.card.cascade is not None and "celleconet.onnx" in pkg.checksums()
    engine = Engine(pkg)
    slide = slides_dir / "CMU-1-Small-Region.svs"
    with engine.prepare_slide(slide) as prepared:
        run = engine.run_pipeline(prepared.reader, prepared.plan)
        heads = engine.run_heads(run.embeddings)
    out = Cascade(pkg).run(slide, prepared.plan, run.level0_xy, run.grid_index, heads)
    assert out.result.risk is not None and 0.0 < out.result.probability < 1.0
    # the ONNX risk equals PyTorch's on the very inputs the server built
    inputs = out.sentences.model_inputs(out.words)
    assert inputs["words"].shape[1] == out.result.sentences
    with torch.no_grad():
        risk, prob, region_att, _ = model(*(torch.as_tensor(v) for v in inputs.values()))
    assert out.result.risk == pytest.approx(float(risk[0]), abs=1e-4)
    assert out.result.probability == pytest.approx(float(prob[0]), abs=1e-4)
    np.testing.assert_allclose(out.region_attention, region_att[0].numpy(), atol=1e-5)


def test_served_words_equal_training_words() -> None:
    from training.celleconet.vocab import Codebook, fit_codebook

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(400, 15)).astype(np.float32) * 3 + 10
    feats[::7, 9] = np.nan  # an unmeasured stain value
    types = rng.integers(0, 4, 400)
    book = fit_codebook(feats, VocabConfig(n_words=3), types)
    served = Vocabulary.from_dict(book.to_dict())
    assert np.array_equal(served.assign(feats, types), book.assign(feats, types))
    blind = fit_codebook(feats, VocabConfig(n_words=5, by_type=False))
    assert np.array_equal(
        Vocabulary.from_dict(blind.to_dict()).assign(feats, types), blind.assign(feats, types)
    )
    assert isinstance(Codebook.from_dict(book.to_dict()), Codebook)


def test_served_phrases_equal_training_phrases() -> None:
    from training.celleconet.phrases import neighbour_graph as train_graph

    rng = np.random.default_rng(1)
    xy = rng.uniform(-50, 50, (64, 2))
    for k, radius in ((6, 30.0), (3, 10.0), (10, 200.0)):
        a, b = neighbour_graph(xy, k, radius), train_graph(xy, k, radius)
        assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
