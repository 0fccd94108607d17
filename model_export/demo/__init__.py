"""The project's demo model, built offline in minutes on a CPU from the real test slides.

What it is: a tiny ViT student (patch 14, 224 px at 2.0 um/px) distilled from the deterministic
handcrafted 20x teacher (stain densities and texture statistics of each 20x tile), so it learns
20x-level statistics from 5x pixels, plus a slide-level modality head (H&E / IHC / fluorescence)
trained on its embeddings, exported through ``model_export`` into a model package. A
demonstration of the pipeline, not a diagnostic model.

    slides -> core tissue mask -> 20x/5x fields (train: top of each slide, held out: bottom band)
           -> augmented-view bank (teacher run once per view) -> distillation -> EMA student
           -> core SlideTiles (5x) -> slide bags -> modality head (leave-one-slide-out)
           -> checkpoint -> export_package -> package (card, report, parity)

It sits above ``training`` (whose library it drives) and the export (which it ends with), so
neither of those imports it. Modules by concern:

    model_export.demo.config      slides, ``DemoConfig``, the distillation config it implies
    model_export.demo.steps       fields, teacher bank, ``BankDistiller``
    model_export.demo.evaluation  modality head, loss curve, report limits
    model_export.demo.package     the export into a model package
    model_export.demo.build       ``run_demo``: the recipe end to end

Run it with ``python -m model_export demo`` (``make demo-model``). Honest limits, also written
into the report: 7 slides, of which only those scanned at 20x or finer and larger than one 448-um
field give distillation fields, and only those with a kept 5x tile give the modality head a bag;
each slide's modality is predicted by a head trained on the others.
"""

from model_export.demo.build import run_demo
from model_export.demo.config import DEMO_PACKAGE_NAME, DEMO_SLIDES, DemoConfig, DemoSlide
from model_export.demo.package import export_demo
from model_export.demo.steps import BankDistiller, FieldBank, build_bank

__all__ = [
    "DEMO_PACKAGE_NAME",
    "DEMO_SLIDES",
    "BankDistiller",
    "DemoConfig",
    "DemoSlide",
    "FieldBank",
    "build_bank",
    "export_demo",
    "run_demo",
]
