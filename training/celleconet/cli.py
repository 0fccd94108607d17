"""``python -m training celleconet``: planted, vocab, cv.

Heavy imports (torch, scikit-learn, lifelines) happen inside the commands, so ``python -m
training --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["app"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="CellEcoNet: slides read as a language of cells (recurrence risk from cell tables).",
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _config(path: Path | None, **train_overrides: object):
    from training.celleconet.config import CelleconetConfig

    cfg = (
        CelleconetConfig.model_validate_json(path.read_text())
        if path is not None
        else CelleconetConfig()
    )
    updates = {k: v for k, v in train_overrides.items() if v is not None}
    if updates:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=updates)})
    return cfg


@app.command()
def planted(
    out: Annotated[Path, typer.Option(help="cohort folder (cells/, labels.csv, truth.csv)")],
    consep: Annotated[
        Path,
        typer.Option(help="CoNSeP crops: <name>.jpg, <name>_inst.npy|.png, <name>_centroids.csv"),
    ],
    signal: Annotated[str, typer.Option(help="composition or arrangement")] = "arrangement",
    slides: Annotated[int, typer.Option(help="slides (one per patient)")] = 80,
    beta: Annotated[float, typer.Option(help="log-hazard ratio across the factor's range")] = 8.0,
    seed: int = 0,
) -> None:
    """Build a planted cohort from real CoNSeP nuclei (risk from composition or arrangement)."""
    from training.celleconet.planted import build_planted_cohort, load_consep_pool

    pool = load_consep_pool(consep)
    labels = build_planted_cohort(out, signal, slides, beta=beta, seed=seed, pool=pool)
    console.print(f"labels {labels}")


@app.command()
def vocab(
    cells: Annotated[Path, typer.Option(help="folder of slide folders of cell npz files")],
    out: Annotated[Path, typer.Option(help="codebook JSON to write")],
    words: Annotated[int, typer.Option(help="words per cell type (or in all)")] = 4,
    by_type: Annotated[bool, typer.Option(help="one k-means per cell type")] = True,
    seed: int = 0,
) -> None:
    """Fit the cell codebook (k-means over standardised features) on every slide in CELLS."""
    from training.celleconet.config import VocabConfig
    from training.celleconet.io import load_slide_cells
    from training.celleconet.vocab import fit_codebook

    folders = sorted(p for p in cells.iterdir() if p.is_dir())
    tables = [load_slide_cells(p) for p in folders]
    book = fit_codebook(
        [t.features for t in tables],
        VocabConfig(n_words=words, by_type=by_type, seed=seed),
        [t.types for t in tables],
    )
    console.print(f"codebook of {book.n_words} words from {len(folders)} slides: {book.save(out)}")


@app.command()
def cv(
    cells: Annotated[Path, typer.Option(help="folder of <slide>/ folders of cell npz files")],
    labels: Annotated[Path, typer.Option(help="CSV patient,slide,time,event[,subgroups]")],
    out: Annotated[Path, typer.Option(help="report folder")],
    config: Annotated[Path | None, typer.Option(help="CelleconetConfig as JSON")] = None,
    method: Annotated[
        list[str] | None, typer.Option(help="methods to compare (default: all registered)")
    ] = None,
    folds: int | None = None,
    epochs: int | None = None,
    shuffle_labels: Annotated[bool, typer.Option(help="permute labels (a null check)")] = False,
    threads: Annotated[int, typer.Option(help="torch intra-op threads")] = 1,
) -> None:
    """k-fold CV by patient: C-index, AUC at 5 years, HR and log-rank, KM curves, subgroups."""
    import torch

    from training.celleconet.cv import cross_validate, load_cohort, write_report
    from training.celleconet.methods import METHODS

    torch.set_num_threads(threads)
    cfg = _config(config, folds=folds, epochs=epochs)
    cohort = load_cohort(cells, labels, cfg)
    result = cross_validate(cohort, cfg, method or list(METHODS), shuffle_labels=shuffle_labels)
    md = write_report(result, out, "CellEcoNet cross-validation", cfg.train.horizon_years)
    for name, m in result.methods.items():
        console.print(f"{name}: pooled C-index {m['pooled']['c_index']:.3f}")
    console.print(f"report {md} ({json.dumps(str(out / 'report.json'))})")
