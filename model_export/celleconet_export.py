"""CellEcoNet -> ONNX, its parity with PyTorch, and a cascade model package.

The graph (names are the card's ``cascade.model``, ``xmag.package.CellModelIO``):

    words int64 [B, R, M], types int64 [B, R, M], xy_um float32 [B, R, M, 2],
    nbr_index int64 [B, R, M, K], nbr_mask bool [B, R, M, K], cell_mask bool [B, R, M],
    region_mask bool [B, R]
      -> risk float32 [B], p5y float32 [B], region_attention float32 [B, R],
         cell_attention float32 [B, R, M]

B (slides), R (sentences) and M (cells per sentence) are dynamic; K (neighbours per cell) is
fixed by the card's ``sentences.k_neighbours``. The module is
``training.celleconet.model.CellEcoNet`` (its ``forward`` has exactly these inputs and outputs).

``build_cascade_package`` copies a 5x package (encoder, heads), adds the exported graph and the
vocabulary, and writes a card with a ``cascade`` section whose every file is checksummed; the
result loads with ``xmag.package.load_package`` (which checks the graph's names against the card).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from model_export.errors import ExportError
from model_export.onnx_export import (
    DEFAULT_OPSET,
    _run_exporter,
    check_onnx,
    strip_build_metadata,
)
from xmag.package import (
    CARD_FILENAME,
    CELL_MODEL_INPUTS,
    CascadeSpec,
    CellModelIO,
    FileEntry,
    ModelCard,
    load_package,
    sha256_file,
)

__all__ = [
    "CELL_MODEL_OUTPUTS",
    "CellModelParity",
    "build_cascade_package",
    "example_inputs",
    "export_cell_model",
    "onnx_outputs",
    "run_cell_parity",
]

#: Output names, in ``CellEcoNet.forward``'s order.
CELL_MODEL_OUTPUTS = ("risk", "p5y", "region_attention", "cell_attention")
#: Largest parity error accepted (float32 through two different kernels).
PARITY_ATOL = 1e-4


class _ForExport(nn.Module):
    """``forward`` with plain positional tensors and outputs cast to float32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        words: Tensor,
        types: Tensor,
        xy_um: Tensor,
        nbr_index: Tensor,
        nbr_mask: Tensor,
        cell_mask: Tensor,
        region_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        risk, prob, region_att, cell_att = self.model(
            words, types, xy_um, nbr_index, nbr_mask, cell_mask, region_mask
        )
        return risk.float(), prob.float(), region_att.float(), cell_att.float()


def example_inputs(
    n_words: int,
    *,
    b: int = 2,
    r: int = 3,
    m: int = 5,
    k: int = 6,
    n_types: int = 4,
    seed: int = 0,
    pad: bool = True,
) -> dict[str, np.ndarray]:
    """Random valid inputs (padded cells and regions included when ``pad``)."""
    rng = np.random.default_rng(seed)
    cell_mask = np.ones((b, r, m), bool)
    region_mask = np.ones((b, r), bool)
    if pad:
        cell_mask[:, :, m - 1] = False
        cell_mask[0, 0, 1:] = False
        region_mask[-1, -1] = False
    nbr_index = rng.integers(0, m, (b, r, m, k)).astype(np.int64)
    nbr_mask = rng.random((b, r, m, k)) < 0.7
    nbr_mask &= np.take_along_axis(cell_mask[..., None].repeat(k, -1), nbr_index, axis=2)
    return {
        "words": rng.integers(0, n_words, (b, r, m)).astype(np.int64),
        "types": rng.integers(0, n_types, (b, r, m)).astype(np.int64),
        "xy_um": rng.uniform(-50, 50, (b, r, m, 2)).astype(np.float32),
        "nbr_index": nbr_index,
        "nbr_mask": nbr_mask,
        "cell_mask": cell_mask,
        "region_mask": region_mask,
    }


def export_cell_model(
    model: nn.Module, out_path: Path, *, n_words: int, k: int, opset: int = DEFAULT_OPSET
) -> Path:
    """Export a CellEcoNet-like module (see the module docstring) to ``out_path``.

    Raises:
        ExportError: the exporter failed or the graph fails ``onnx.checker``.
    """
    wrapper = _ForExport(model.eval()).eval()
    ex = example_inputs(n_words, k=k, b=2, r=3, m=5)
    args = tuple(torch.as_tensor(ex[n]) for n in CELL_MODEL_INPUTS)
    b = torch.export.Dim("slides", min=1, max=1024)
    r = torch.export.Dim("regions", min=1, max=65_536)
    m = torch.export.Dim("cells", min=2, max=4096)
    dyn: dict[str, dict[int, object]] = {
        "words": {0: b, 1: r, 2: m},
        "types": {0: b, 1: r, 2: m},
        "xy_um": {0: b, 1: r, 2: m},
        "nbr_index": {0: b, 1: r, 2: m},
        "nbr_mask": {0: b, 1: r, 2: m},
        "cell_mask": {0: b, 1: r, 2: m},
        "region_mask": {0: b, 1: r},
    }
    with torch.no_grad():
        _run_exporter(
            wrapper,
            args,
            out_path,
            input_names=list(CELL_MODEL_INPUTS),
            output_names=list(CELL_MODEL_OUTPUTS),
            dynamic_shapes=dyn,
            opset=opset,
        )
    strip_build_metadata(out_path)
    check_onnx(out_path)
    return out_path


def onnx_outputs(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the exported graph on CPU (one thread) and return its outputs by name."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, inputs), strict=True))


@dataclass(frozen=True)
class CellModelParity:
    """Largest absolute difference per output, ONNX vs PyTorch, over the shapes tried."""

    max_abs: dict[str, float]
    shapes: list[tuple[int, int, int]]
    atol: float = PARITY_ATOL

    @property
    def ok(self) -> bool:
        return all(v <= self.atol for v in self.max_abs.values())

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs": self.max_abs, "shapes": self.shapes, "atol": self.atol, "ok": self.ok}


def run_cell_parity(
    model: nn.Module,
    path: Path,
    *,
    n_words: int,
    k: int,
    shapes: tuple[tuple[int, int, int], ...] = ((1, 1, 2), (1, 7, 33), (3, 4, 64)),
) -> CellModelParity:
    """Compare ONNX and PyTorch outputs on random padded inputs of several (B, R, M) shapes
    (shapes other than the export example: the dynamic axes must really be dynamic)."""
    worst = dict.fromkeys(CELL_MODEL_OUTPUTS, 0.0)
    wrapper = _ForExport(model.eval()).eval()
    for i, (b, r, m) in enumerate(shapes):
        ex = example_inputs(n_words, b=b, r=r, m=m, k=k, seed=100 + i, pad=m > 2)
        with torch.no_grad():
            ref = wrapper(*(torch.as_tensor(ex[n]) for n in CELL_MODEL_INPUTS))
        got = onnx_outputs(path, ex)
        for name, t in zip(CELL_MODEL_OUTPUTS, ref, strict=True):
            diff = float(np.max(np.abs(got[name] - t.numpy()))) if t.numel() else 0.0
            worst[name] = max(worst[name], diff)
    return CellModelParity(worst, [tuple(s) for s in shapes])


def build_cascade_package(
    base_dir: Path,
    out_dir: Path,
    *,
    model: nn.Module,
    vocabulary: dict[str, Any],
    cascade: CascadeSpec,
    name: str,
    version: str,
    description: str,
    trained: bool,
    intended_use: str = "",
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """A 5x package plus a cascade: copies ``base_dir``, exports ``model``, writes the
    vocabulary and the card, checks ONNX/PyTorch parity (``parity_cells.json``), and loads the
    result with ``load_package`` before returning its folder.

    Raises:
        ExportError: the export or the parity check failed.
        ModelPackageError: the written package does not load.
    """
    base = load_package(base_dir)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(base.root, out_dir)
    io = CellModelIO(file=cascade.model.file)
    cascade = cascade.model_copy(update={"model": io})
    n_words = len(vocabulary["centroids"])
    k = cascade.sentences.k_neighbours
    onnx_path = export_cell_model(model, out_dir / io.file, n_words=n_words, k=k)
    parity = run_cell_parity(model, onnx_path, n_words=n_words, k=k)
    (out_dir / "parity_cells.json").write_text(json.dumps(parity.to_dict(), indent=2) + "\n")
    if not parity.ok:
        raise ExportError(
            f"{onnx_path}: ONNX and PyTorch differ by {parity.max_abs} (atol {parity.atol}); "
            "the export is not faithful.",
            reason="parity",
            path=onnx_path,
        )
    (out_dir / cascade.vocabulary).write_text(json.dumps(vocabulary, indent=1) + "\n")
    for rel, src in (extra_files or {}).items():
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out_dir / rel)
    new = [io.file, cascade.vocabulary, "parity_cells.json", *(extra_files or {})]
    files = [f for f in base.card.files if f.path not in new]
    for rel in new:
        p = out_dir / rel
        files.append(FileEntry(path=rel, sha256=sha256_file(p), size_bytes=p.stat().st_size))
    card = base.card.model_copy(
        update={
            "name": name,
            "version": version,
            "trained": trained,
            "description": description,
            "intended_use": intended_use or base.card.intended_use,
            "files": files,
            "cascade": cascade,
        }
    )
    card = ModelCard.model_validate(card.model_dump())  # run the card's own checks
    (out_dir / CARD_FILENAME).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
    load_package(out_dir)
    return out_dir


DEMO_DESCRIPTION = (
    "DEMONSTRATION MODEL, NOT A DIAGNOSTIC MODEL. The 5x encoder and heads of {base} plus a "
    "CellEcoNet cascade whose context model was trained on a *planted* cohort: real CoNSeP "
    "nuclei (colorectal, 0.25 um/px) placed by a program so that risk follows their "
    "arrangement ({signal} signal, {slides} synthetic slides, times drawn from a known hazard). "
    "It shows that the cascade runs end to end (regions read at 0.5 um/px, cells detected, "
    "words, sentences, the ONNX context model, cells.geojson). Its risk and 5-year probability "
    "carry no clinical meaning and were never validated on patients."
)
DEMO_INTENDED_USE = (
    "Demonstration and testing of xmag-serve only. Not for diagnosis, prognosis, research "
    "conclusions or any clinical use."
)


def train_demo_package(
    out_dir: Path,
    base_dir: Path,
    work_dir: Path,
    *,
    slides: int = 60,
    signal: str = "arrangement",
    seed: int = 0,
    consep_dir: Path,
    cascade: CascadeSpec | None = None,
) -> Path:
    """Train CellEcoNet on a planted cohort and package it with ``base_dir``'s 5x model.

    Uses the model engineer's training code as it stands (``training.celleconet``): the planted
    cohort, a per-type codebook fitted on all its cells, masked-word pretraining and the
    survival fit on every slide (no held-out set: ``python -m training celleconet cv`` is the
    evaluation). The card's sentences and model settings follow the training configuration.
    """
    from training.celleconet.config import CelleconetConfig
    from training.celleconet.cv import load_cohort
    from training.celleconet.model import CellEcoNet
    from training.celleconet.planted import build_planted_cohort, load_consep_pool
    from training.celleconet.sentences import stack_slides
    from training.celleconet.train import fit_survival, pretrain_mlm
    from training.celleconet.vocab import fit_codebook
    from xmag.package import SentenceSpec

    torch.set_num_threads(1)
    cfg = CelleconetConfig()
    work_dir = Path(work_dir)
    labels = build_planted_cohort(
        work_dir / "planted", signal, slides, seed=seed, pool=load_consep_pool(Path(consep_dir))
    )
    cohort = load_cohort(work_dir / "planted" / "cells", labels, cfg)
    data = cohort.data
    codebook = fit_codebook(data.features, cfg.vocab, data.types)
    words = [codebook.assign(f, t) for f, t in zip(data.features, data.types, strict=True)]
    arrays = stack_slides(data.sentences, words)
    every = np.arange(len(data.names))
    torch.manual_seed(cfg.train.seed)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    model = CellEcoNet(codebook.n_words, cfg.model, seed=cfg.train.seed)
    pretrain = pretrain_mlm(model, arrays, every, cfg.train, gen)
    fit = fit_survival(model, arrays, every, data.time, data.event, cfg.train, gen)
    model.eval()
    report = {
        "cohort": {"signal": signal, "slides": slides, "seed": seed},
        "config": json.loads(cfg.model_dump_json()),
        "pretrain": pretrain,
        "fit": {k: v for k, v in fit.items() if isinstance(v, int | float | str | list)},
    }
    report_path = work_dir / "training_report.json"
    report_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    s = cfg.sentences
    spec = cascade or CascadeSpec()
    spec = spec.model_copy(
        update={
            "sentences": SentenceSpec(
                region_um=s.region_um,
                max_cells=s.max_cells,
                min_cells=s.min_cells,
                k_neighbours=s.k_neighbours,
                radius_um=s.radius_um,
                seed=s.seed,
            ),
            "horizon_years": cfg.train.horizon_years,
        }
    )
    base_name = load_package(base_dir).card.name
    return build_cascade_package(
        base_dir,
        out_dir,
        model=model,
        vocabulary=codebook.to_dict(),
        cascade=spec,
        name="celleconet-demo",
        version="0.1.0",
        description=DEMO_DESCRIPTION.format(base=base_name, signal=signal, slides=slides),
        trained=True,
        intended_use=DEMO_INTENDED_USE,
        extra_files={"training/celleconet_report.json": report_path},
    )


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m model_export.celleconet_export",
        description="Build the demonstration CellEcoNet package (not diagnostic).",
    )
    ap.add_argument("--out", type=Path, required=True, help="package folder to write")
    ap.add_argument("--base", type=Path, required=True, help="the 5x package to extend")
    ap.add_argument("--work", type=Path, required=True, help="cohort and report folder")
    ap.add_argument("--consep", type=Path, required=True, help="CoNSeP crops (planted cells)")
    ap.add_argument("--slides", type=int, default=60)
    args = ap.parse_args(argv)
    out = train_demo_package(
        args.out, args.base, args.work, slides=args.slides, consep_dir=args.consep
    )
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
