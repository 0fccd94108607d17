"""The cascade's one step after the 5x pass: pick regions, read them at 20x, cells, model.

    5x tiles + head outputs -> select_regions (K fields)              xmag.cascade.select
       -> read_tile_at at read_mpp (same level choice and resampling)  xmag.tiles, xmag.level
       -> detect_image per field (threads)                             xmag.cells
       -> words (Vocabulary) -> sentences -> context model (ONNX)      xmag.cascade.vocabulary,
                                                                       .sentences
       -> cells.geojson, cascade_heatmap.png, result fields            xmag.cascade.files

Only the K fields are read at cell resolution: a slide is never read whole at 20x.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from xmag.cascade.select import PickedRegion, rule_name, select_regions, tile_values
from xmag.cascade.sentences import Sentences, build_sentences
from xmag.cascade.vocabulary import Vocabulary
from xmag.cells.detect import DetectorParams
from xmag.cells.regions import detect_image
from xmag.cells.table import CELL_TYPES, CellTable
from xmag.errors import JobCanceledError
from xmag.heads import HeadOutputs
from xmag.level import choose_level
from xmag.package import CELL_MODEL_INPUTS, CascadeSpec, ModelPackage
from xmag.plan import SlidePlan
from xmag.readers import open_slide
from xmag.readers.base import SlideReader
from xmag.results import CascadeOut, CascadeRegion, HeadPrediction
from xmag.runtime import ModelSession
from xmag.settings import EngineSettings, available_cpus
from xmag.tiles import level_origins, read_tile_at

__all__ = ["Cascade", "CascadeOutcome"]

_SEED = 0  # subsampling of fields above max_cells_per_region


@dataclass
class CascadeOutcome:
    """What the cascade found on one slide (``result`` goes into result.json).

    Attributes:
        result: the ``cascade`` entry of result.json.
        prediction: the task's entry of ``predictions`` (None when no sentence was read).
        cells: every nucleus of the regions, one frame at ``read_mpp`` with level-0 origin 0.
        words: (N,) word of each cell.
        cell_attention: (N,) attention of each cell inside its sentence (NaN: in none).
        slide_attention: (N,) region attention x cell attention (NaN: in no sentence).
        sentences: the model's input geometry.
        region_attention: (R,) per sentence.
    """

    result: CascadeOut
    prediction: HeadPrediction | None
    cells: CellTable
    words: np.ndarray
    cell_attention: np.ndarray
    slide_attention: np.ndarray
    sentences: Sentences
    region_attention: np.ndarray
    regions: list[PickedRegion]
    level0_mpp: float
    artifacts: dict[str, str]

    @property
    def predictions(self) -> list[HeadPrediction]:
        """The task's entry for result.json's ``predictions`` (none without a risk)."""
        return [self.prediction] if self.prediction is not None else []


def _detector_params(spec: CascadeSpec) -> DetectorParams:
    over = {k: (tuple(v) if isinstance(v, tuple | list) else v) for k, v in spec.detector.items()}
    return DetectorParams(**{**asdict(DetectorParams()), **over})


class Cascade:
    """A package's cascade, loaded once (vocabulary and ONNX session), run per slide."""

    def __init__(
        self, package: ModelPackage, settings: EngineSettings | None = None, *, workers: int = 0
    ) -> None:
        spec = package.card.cascade
        if spec is None:
            raise ValueError(f"{package.root}: the card has no cascade")
        settings = settings or EngineSettings()
        self.package = package
        self.spec = spec
        self.vocab = Vocabulary.load(package.root / spec.vocabulary)
        self.session = ModelSession(package.root / spec.model.file, settings, allow_tensorrt=False)
        self.params = _detector_params(spec)
        #: threads reading and detecting fields (OpenCV and the readers release the GIL): the
        #: CPUs this process may use (``available_cpus``: the container's, not the host's)
        self.workers = workers or available_cpus()

    @classmethod
    def load(cls, package: ModelPackage, settings: EngineSettings | None = None) -> Cascade | None:
        """The package's cascade, or None when its card has none."""
        return cls(package, settings) if package.card.cascade is not None else None

    # -- one slide ------------------------------------------------------------------------
    def run(
        self,
        slide_path: Path,
        plan: SlidePlan,
        level0_xy: np.ndarray,
        grid_index: np.ndarray,
        heads: HeadOutputs,
        out_dir: Path | None = None,
        *,
        should_cancel: Callable[[], bool] | None = None,
    ) -> CascadeOutcome:
        """Open the slide again (the 5x pass has closed it) and run ``run_on_reader``."""
        with open_slide(slide_path) as reader:
            return self.run_on_reader(
                reader, plan, level0_xy, grid_index, heads, out_dir, should_cancel=should_cancel
            )

    def run_on_reader(
        self,
        reader: SlideReader,
        plan: SlidePlan,
        level0_xy: np.ndarray,
        grid_index: np.ndarray,
        heads: HeadOutputs,
        out_dir: Path | None = None,
        *,
        should_cancel: Callable[[], bool] | None = None,
    ) -> CascadeOutcome:
        """Select, read, detect, run the model; write cells.geojson and cascade_heatmap.png
        into ``out_dir`` when given.

        Args:
            plan: the 5x plan (mpp, grid, tissue thumbnail).
            level0_xy, grid_index: the embedded tiles (``PipelineRun``).
            heads: the 5x heads' outputs (the selection rule may read them).

        Raises:
            JobCanceledError: ``should_cancel()`` turned True between two regions.
            RegionReadError: a region could not be decoded.
            InferenceError: the context model failed.
        """
        started = time.perf_counter()
        spec, card = self.spec, self.package.card
        level0_mpp = plan.mpp.mpp
        values = tile_values(card, spec, plan, np.asarray(grid_index), heads)
        side0 = max(1, round(spec.size_um / level0_mpp))
        picked = select_regions(
            values,
            level0_xy,
            grid_index,
            level0_tile=float(plan.grid.level0_tile),
            level0_side=side0,
            dimensions=(int(plan.slide.dimensions[0]), int(plan.slide.dimensions[1])),
            k=spec.k,
        )
        level = choose_level(reader, level0_mpp, spec.read_mpp)
        frame_mpp = level.level_mpp * level.resample_factor
        side_px = spec.region_px
        # the level-0 extent really read (a level within 2% of read_mpp is read as is)
        read_side0 = round(level.read_px(side_px) * level.level_downsample)
        seconds = {"read": 0.0, "detect": 0.0}

        def one(region: PickedRegion) -> tuple[CellTable, float, float, tuple[int, int]]:
            if should_cancel is not None and should_cancel():
                raise JobCanceledError(
                    f"{reader.path}: canceled during the cascade (region {region.rank}).",
                    path=reader.path,
                    stage="cascade",
                )
            t0 = time.perf_counter()
            pixels = read_tile_at(reader, level, region.level0_xy, side_px)
            t1 = time.perf_counter()
            # where the read really starts: the origin rounded to the level's pixels
            real = level_origins(np.asarray(region.level0_xy), level)[0] * level.level_downsample
            origin = (float(real[0]), float(real[1]))
            cells = detect_image(pixels, frame_mpp, params=self.params, origin_px=origin)
            if len(cells) > spec.max_cells_per_region:
                rng = np.random.default_rng(_SEED + region.rank)
                keep = np.sort(rng.choice(len(cells), spec.max_cells_per_region, replace=False))
                cells = cells.subset(keep)
            real_xy = (round(origin[0]), round(origin[1]))
            return cells, t1 - t0, time.perf_counter() - t1, real_xy

        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="cascade") as pool:
            found = list(pool.map(one, picked))
        tables = []
        regions_out = []
        for region, (cells, read_s, detect_s, real_xy) in zip(picked, found, strict=True):
            seconds["read"] += read_s
            seconds["detect"] += detect_s
            tables.append(cells)
            regions_out.append(
                CascadeRegion(
                    rank=region.rank,
                    level0_box=(real_xy[0], real_xy[1], read_side0, read_side0),
                    value=region.value,
                    grid_index=region.grid_index,
                    cells=len(cells),
                )
            )
        table = (
            CellTable.concat(tables, level0_mpp=level0_mpp)
            if tables
            else CellTable.empty(frame_mpp, "xmag-detector")
        )
        t_model = time.perf_counter()
        words = self.vocab.assign(table.features, table.types)
        boxes_um = (
            np.array(
                [[r.level0_box[0], r.level0_box[1], r.level0_box[2]] for r in regions_out],
                np.float64,
            ).reshape(-1, 3)
            * level0_mpp
        )
        sentences = build_sentences(table.xy_um, table.types, spec.sentences, boxes_um)
        n = len(table)
        cell_att = np.full(n, np.nan, np.float32)
        slide_att = np.full(n, np.nan, np.float32)
        region_att = np.zeros(sentences.n_regions, np.float32)
        risk: float | None = None
        prob: float | None = None
        warnings: list[str] = []
        if sentences.n_regions:
            risk, prob, region_att, per_slot = self._model(sentences, words)
            m = per_slot.shape[1]
            mask = sentences.cell_mask[:, :m]
            rows = sentences.cell_index[:, :m][mask]
            cell_att[rows] = per_slot[mask]
            slide_att[rows] = (region_att[:, None] * per_slot)[mask]
        else:
            warnings.append(
                f"no {spec.sentences.region_um:g} um square of the {len(picked)} regions read "
                f"holds {spec.sentences.min_cells} cells ({n} cells found): no risk is given"
            )
        if len(picked) < spec.k:
            warnings.append(
                f"{len(picked)} of the {spec.k} regions asked for fit on the tissue kept at 5x"
            )
        seconds["model"] = time.perf_counter() - t_model
        outcome = CascadeOutcome(
            result=CascadeOut(
                task=spec.task,
                rule=rule_name(card, spec),
                k=spec.k,
                size_um=spec.size_um,
                read_mpp=frame_mpp,
                level=level,
                regions=regions_out,
                cells=n,
                cell_types={
                    name: int(c)
                    for name, c in zip(
                        CELL_TYPES, np.bincount(table.types, minlength=len(CELL_TYPES)), strict=True
                    )
                },
                sentences=sentences.n_regions,
                cells_in_sentences=int(sentences.cell_mask.sum()),
                risk=risk,
                probability=prob,
                horizon_years=spec.horizon_years,
                warnings=warnings,
                timings={},
            ),
            prediction=None if prob is None else _prediction(spec, prob),
            cells=table,
            words=words,
            cell_attention=cell_att,
            slide_attention=slide_att,
            sentences=sentences,
            region_attention=region_att,
            regions=picked,
            level0_mpp=level0_mpp,
            artifacts={},
        )
        if out_dir is not None:
            from xmag.cascade.files import write_cascade_files

            t_write = time.perf_counter()
            outcome.artifacts = write_cascade_files(Path(out_dir), plan, outcome)
            seconds["write"] = time.perf_counter() - t_write
        seconds["wall"] = time.perf_counter() - started
        outcome.result.timings = {k: round(v, 6) for k, v in seconds.items()}
        return outcome

    def _model(
        self, sentences: Sentences, words: np.ndarray
    ) -> tuple[float, float, np.ndarray, np.ndarray]:
        io = self.spec.model
        arrays = sentences.model_inputs(words)
        feed = {name: arrays[key] for name, key in zip(io.inputs, CELL_MODEL_INPUTS, strict=True)}
        out = self.session.run(
            feed, [io.risk, io.probability, io.region_attention, io.cell_attention]
        )
        return (
            float(np.asarray(out[io.risk]).reshape(-1)[0]),
            float(np.asarray(out[io.probability]).reshape(-1)[0]),
            np.asarray(out[io.region_attention], np.float32).reshape(-1),
            np.asarray(out[io.cell_attention], np.float32)[0],
        )


def _prediction(spec: CascadeSpec, prob: float) -> HeadPrediction:
    yes = f"recurrence_within_{spec.horizon_years:g}y"
    labels = [f"no_{yes}", yes]
    probs = {labels[0]: 1.0 - prob, labels[1]: prob}
    return HeadPrediction(
        name=spec.task,
        level="slide",
        kind=spec.kind,
        labels=labels,
        probabilities=probs,
        top_label=labels[int(prob >= 0.5)],
        attention=True,
    )
