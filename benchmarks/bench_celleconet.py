"""CellEcoNet on planted cohorts (a script, not a test): does each method find what drives risk?

Two cohorts of slides built from real CoNSeP nuclei (``training.celleconet.planted``):
``composition`` (risk follows how many lymphocytes there are) and ``arrangement`` (risk follows
whether lymphocytes infiltrate tumour nests; every region has the same cell counts). On the same
patient folds it fits the contextual model (``celleconet``), the bag-of-cells baseline (word and
type frequencies, no positions), ABMIL over per-region mean cell features (a stand-in for ABMIL on
5x tile embeddings, which these cohorts have no pixels for) and the contextual model on labels
permuted among patients (a null check). It prints one markdown table of held-out C-index
(pooled out-of-fold; fold mean in brackets) and writes each run's report (JSON, markdown,
Kaplan-Meier PNGs) under --workdir.

    python benchmarks/bench_celleconet.py [--slides 80] [--folds 5] [--workdir .bench/celleconet]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.celleconet.config import CelleconetConfig, TrainConfig  # noqa: E402
from training.celleconet.cv import cross_validate, load_cohort, write_report  # noqa: E402
from training.celleconet.metrics import concordance  # noqa: E402
from training.celleconet.planted import (  # noqa: E402
    SIGNALS,
    build_planted_cohort,
    load_consep_pool,
)

METHODS = ("celleconet", "bag_of_cells", "abmil_region_means")
ROWS = (*METHODS, "celleconet (shuffled labels)")


def _oracle(folder: Path) -> float:
    """C-index of the true log-hazard: the ceiling any model can reach on this cohort."""
    with (folder / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    with (folder / "truth.csv").open() as fh:
        truth = {r["slide"]: float(r["log_hazard_ratio"]) for r in csv.DictReader(fh)}
    t = np.array([float(r["time"]) for r in rows])
    e = np.array([int(r["event"]) for r in rows])
    return concordance(t, e, np.array([truth[r["slide"]] for r in rows]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--slides", type=int, default=80)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "celleconet")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = CelleconetConfig(train=TrainConfig(folds=args.folds, epochs=args.epochs, seed=args.seed))
    pool = load_consep_pool(ROOT / "tests" / "data" / "nuclei" / "consep")
    print(f"real nuclei per type: {pool.counts()} from {', '.join(pool.sources)}", flush=True)
    table: dict[str, dict[str, str]] = {r: {} for r in ROWS}
    summary: dict[str, object] = {"config": cfg.model_dump(mode="json"), "cohorts": {}}
    oracle = {}
    for signal in SIGNALS:
        folder = args.workdir / f"{signal}_{args.slides}_{args.seed}"
        if not (folder / "labels.csv").is_file():
            build_planted_cohort(folder, signal, args.slides, seed=args.seed, pool=pool)
        oracle[signal] = _oracle(folder)
        cohort = load_cohort(folder / "cells", folder / "labels.csv", cfg)
        t0 = time.perf_counter()
        res = cross_validate(cohort, cfg, METHODS)
        null = cross_validate(cohort, cfg, ["celleconet"], shuffle_labels=True)
        write_report(res, folder / "report", f"Planted cohort: {signal}", 5.0)
        write_report(null, folder / "report_shuffled", f"Planted: {signal}, shuffled", 5.0)
        runs = {**res.methods, "celleconet (shuffled labels)": null.methods["celleconet"]}
        for row, m in runs.items():
            table[row][signal] = f"{m['pooled']['c_index']:.3f} ({m['mean_fold_c_index']:.3f})"
        summary["cohorts"][signal] = {  # type: ignore[index]
            "oracle_c_index": oracle[signal],
            "seconds": time.perf_counter() - t0,
            **{row: {"pooled": m["pooled"], "folds": m["fold_c_index"]} for row, m in runs.items()},
        }
        print(f"{signal}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    (args.workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print()
    print(
        f"Held-out C-index, pooled out-of-fold (fold mean); {args.slides} slides per cohort, "
        f"{args.folds}-fold CV by patient"
    )
    print()
    print("| method | " + " | ".join(SIGNALS) + " |")
    print("|---|" + "---|" * len(SIGNALS))
    for row in ROWS:
        print(f"| {row} | " + " | ".join(table[row].get(s, "") for s in SIGNALS) + " |")
    print("| (oracle: true log-hazard) | " + " | ".join(f"{oracle[s]:.3f}" for s in SIGNALS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
