"""The inference engine: one model package loaded once, slides in, result files out.

    slide -> open_slide -> plan_slide (mpp, level, tissue, grid, QC)      xmag.plan
          -> tiles -> preprocess -> encoder, overlapped in two threads    xmag.pipeline
          -> tile heads (per tile) and slide heads (on the bag)          xmag.heads
          -> features.h5, heatmap.png, tiles.geojson, then result.json   xmag.outputs

The engine owns the ONNX Runtime sessions and composes those stages; it computes every time it
is asked. Callers that keep results name them first (``Engine.identity``) and look them up in
the result store before opening the slide (``xmag.store.lookup_or_embed``). A service worker
keeps one ``Engine`` for its life (``Engine.from_dir``).

``embed_slide`` is ``prepare_slide`` (open, hash, plan: the per-slide fixed costs) then
``finish_slide`` (tiles through the model, heads, files). Several threads may call it at once to
keep slides in flight (``xmag.inflight``): the engine's ``model_gate`` lets one slide at a time
through the tile pipeline, so the next slides are prepared while the model runs the current one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from xmag.cascade import Cascade, CascadeOutcome
from xmag.digest import SlideDigest, slide_digest
from xmag.errors import JobCanceledError, NoTissueError, XmagUsageError
from xmag.heads import HeadOutputs, HeadSet
from xmag.inflight import ModelGate, ModelThread
from xmag.outputs._atomic import atomic_write
from xmag.outputs.slide_files import write_slide_files
from xmag.package import ModelPackage, load_package
from xmag.params import SlideOptions
from xmag.pipeline import CancelFn, PipelineRun, ProgressFn, TileFeed, run_pipeline
from xmag.plan import SlidePlan, plan_slide
from xmag.readers import SlideReader, open_slide
from xmag.results import (
    ModelRef,
    SlideResult,
    describe_plan,
    slide_identity,
)
from xmag.runtime import ModelSession, apply_card_hints
from xmag.settings import EngineSettings
from xmag.store import ResultIdentity
from xmag.version import code_version

__all__ = ["Engine", "PipelineRun", "PreparedSlide", "SlideOptions", "SlideResult"]


@dataclass
class _Stages:
    """Wall seconds per stage on the caller's thread (stages do not overlap)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class PreparedSlide:
    """A slide opened, hashed and planned (``Engine.prepare_slide``), waiting for the model.

    A context manager: leaving it closes the reader (``finish_slide`` does once tiles are read).

    Attributes:
        path: the slide as opened.
        reader: its open reader.
        digest: sha256 and size of its bytes.
        key: the result key (``Engine.result_key``).
        options: the caller's options; ``plan.params`` the tiling parameters they gave.
        plan: every decision made before a tile is read.
        stages: wall seconds so far (open, hash, plan).
        started: ``time.perf_counter()`` when preparing began (the result's ``duration_s``).
    """

    path: Path
    reader: SlideReader
    digest: SlideDigest
    key: str
    options: SlideOptions
    plan: SlidePlan
    stages: _Stages
    started: float

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> PreparedSlide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Engine:
    """A loaded model package with its ONNX Runtime sessions.

    Attributes:
        package: the verified package.
        settings: how sessions and the pipeline run.
        provider: the provider that runs the encoder ("cpu", "cuda", "tensorrt").
        tiles_embedded: tiles run through the encoder since this engine was built.
    """

    def __init__(self, package: ModelPackage, settings: EngineSettings | None = None) -> None:
        self.package = package
        card = package.card
        # The card's runtime hints fill what the caller left unset (variant, TensorRT, batch).
        self.settings = apply_card_hints(settings or EngineSettings(), card)
        self.variant = self.settings.variant
        encoder_file = card.encoder
        if self.variant is not None:
            match = [v for v in card.variants if v.name == self.variant]
            if not match:
                raise XmagUsageError(
                    f"variant {self.variant!r} is not in {package.root}/model.json "
                    f"(has {[v.name for v in card.variants]})"
                )
            encoder_file = match[0].file
        b, t = self.settings.trt_batch_profile, card.input.tile_px
        assert b is not None  # apply_card_hints fills it from the card when unset
        self.encoder = ModelSession(
            package.root / encoder_file,
            self.settings,
            trt_profile={card.input.name: (*b, 3, t, t)},
            input_spec=card.input,  # on GPUs: uint8 tiles in, normalised in the graph
        )
        self.heads = HeadSet.load(package, self.settings)
        #: The cell-level cascade of a card that has one (``xmag.cascade``), run after the heads.
        self.cascade = Cascade.load(package, self.settings)
        self.provider = self.encoder.provider
        self.batch_size = self.settings.batch_size
        if self.provider == "tensorrt":  # a batch outside the profile would rebuild the engine
            self.batch_size = min(self.batch_size, b[2])
        self.preprocess = self.encoder.input_preprocessor(card.input)
        self.tiles_embedded = 0
        #: One slide at a time on the model (``xmag.inflight``): callers in several threads
        #: prepare slides concurrently and take turns here for the tile pipeline.
        self.model_gate = ModelGate()
        #: Encoder calls from threads running nicer than this one come back to its priority.
        self.model_thread = ModelThread()

    @classmethod
    def from_dir(cls, model_dir: Path, settings: EngineSettings | None = None) -> Engine:
        """Load and verify the package in ``model_dir`` (``load_package``), then build sessions."""
        return cls(load_package(model_dir), settings)

    # -- tiles -> embeddings ----------------------------------------------------------------
    def encode(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed input (n, 3, h, w) -> embeddings (n, D) float32, in ``batch_size`` calls."""
        card = self.package.card
        out = []
        for i in range(0, batch.shape[0], self.batch_size):
            res = self.model_thread.call(
                self.encoder.run,
                {card.input.name: batch[i : i + self.batch_size]},
                [card.outputs.embedding.name],
            )
            out.append(np.asarray(res[card.outputs.embedding.name], dtype=np.float32))
        self.tiles_embedded += batch.shape[0]
        return np.concatenate(out) if out else np.empty((0, card.outputs.embedding.dim), np.float32)

    def embed_tiles(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB tiles (n, tile_px, tile_px, 3) -> embeddings (n, D) float32."""
        return self.encode(self.preprocess(pixels))

    def run_pipeline(
        self,
        reader: SlideReader,
        plan: SlidePlan,
        *,
        progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
    ) -> PipelineRun:
        """Embed every kept tile of ``plan`` through this engine (``xmag.pipeline``)."""
        return run_pipeline(
            reader,
            plan,
            preprocess=self.preprocess,
            encode=self.encode,
            dim=self.package.card.outputs.embedding.dim,
            batch_size=self.batch_size,
            reader_workers=self.settings.reader_workers,
            queue_depth=self.settings.queue_depth,
            reader_nice=self.settings.reader_nice,
            progress=progress,
            should_cancel=should_cancel,
        )

    def tile_feed(self, reader: SlideReader, plan: SlidePlan) -> TileFeed:
        """Start reading and preprocessing ``plan``'s tiles (``xmag.pipeline.TileFeed``)."""
        return TileFeed(
            reader,
            plan,
            preprocess=self.preprocess,
            batch_size=self.batch_size,
            reader_workers=self.settings.reader_workers,
            queue_depth=self.settings.queue_depth,
            reader_nice=self.settings.reader_nice,
        )

    def run_heads(self, embeddings: np.ndarray) -> HeadOutputs:
        """Every head on the (N, D) tile embeddings (``xmag.heads``)."""
        return self.heads.run(embeddings, self.batch_size)

    # -- one slide --------------------------------------------------------------------------
    def identity(self, slide_sha256: str, options: SlideOptions | None = None) -> ResultIdentity:
        """What determines the result of this engine on a slide with these options (no I/O)."""
        return ResultIdentity(
            slide_sha256=slide_sha256,
            model=self.package.checksums(),
            variant=self.variant,
            params=self.package.card.tiling_params(options),
            code_version=code_version(),
        )

    def result_key(self, slide_sha256: str, options: SlideOptions | None = None) -> str:
        """The key naming that result in a ``xmag.store.ResultStore``."""
        return self.identity(slide_sha256, options).key()

    def embed_slide(
        self,
        slide_path: Path,
        out_dir: Path,
        *,
        options: SlideOptions | None = None,
        digest: SlideDigest | None = None,
        display_name: str | None = None,
        progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
    ) -> SlideResult:
        """Embed one slide and write result.json, features.h5, heatmap.png and tiles.geojson.

        Each file is written atomically into ``out_dir``; result.json is written last, so its
        presence means the others are complete. This always computes: callers that keep results
        look them up first (``xmag.store.lookup_or_embed``).

        Safe to call from several threads at once (``xmag.inflight``): opening, hashing and
        planning run in the caller's thread; the tile pipeline waits for the engine's model gate
        (one slide on the model at a time, first ready first served); heads and writes follow.

        Args:
            digest: the slide's sha256 and size when the caller knows them (an upload's, or
                ``xmag.digest.DigestCache``); hashed here otherwise (the ``hash`` timing).
            display_name: the slide's name as the caller knows it (default: the file name).

        Raises:
            SlideError subclasses: the slide cannot be read, has no usable mpp, or
                (``NoTissueError``) no tile passes the tissue threshold; ``qc`` in its fields.
            JobCanceledError: ``should_cancel()`` returned True between two batches, or while
                the slide waited for the model.
            InferenceError: ONNX Runtime failed.
        """
        prepared = self.prepare_slide(
            slide_path, options=options, digest=digest, should_cancel=should_cancel
        )
        with prepared:
            return self.finish_slide(
                prepared,
                out_dir,
                display_name=display_name,
                progress=progress,
                should_cancel=should_cancel,
            )

    def prepare_slide(
        self,
        slide_path: Path,
        *,
        options: SlideOptions | None = None,
        digest: SlideDigest | None = None,
        should_cancel: CancelFn | None = None,
    ) -> PreparedSlide:
        """Everything before the first tile reaches the model: open, hash, key, plan.

        ``should_cancel`` is checked by planning (``xmag.plan``: before it, between thumbnail
        reads and before the grid), so a canceled job stops during a long plan too.

        Returns an open ``PreparedSlide`` (a context manager closing its reader); the caller
        passes it to ``finish_slide``. Raises as ``embed_slide`` does (closing the reader).
        """
        started = time.perf_counter()
        stages = _Stages()
        slide_path = Path(slide_path)
        options = options or SlideOptions()
        params = self.package.card.tiling_params(options)
        with stages("open"):
            reader = open_slide(slide_path)  # typed errors for missing or unreadable input
        try:
            if digest is None:
                with stages("hash"):
                    digest = slide_digest(slide_path)
            key = self.result_key(digest.sha256, options)
            with stages("plan"):
                plan = plan_slide(reader, params, should_cancel=should_cancel)
            if plan.qc.zero_tissue or plan.grid.n_kept == 0:
                raise _no_tissue(slide_path, plan)
        except BaseException:
            reader.close()
            raise
        return PreparedSlide(slide_path, reader, digest, key, options, plan, stages, started)

    def finish_slide(
        self,
        prepared: PreparedSlide,
        out_dir: Path,
        *,
        display_name: str | None = None,
        progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
    ) -> SlideResult:
        """The model (behind the gate), heads and files of a ``prepare_slide`` result.

        Starts reading the slide's tiles (at most ``queue_depth`` batches ahead), waits for the
        engine's model gate (``should_cancel`` checked while waiting), encodes every tile, then
        runs the heads and writes the files after releasing the gate. Closes the prepared
        slide's reader once its tiles are read.
        """
        out_dir = Path(out_dir)
        stages, plan = prepared.stages, prepared.plan
        # The first batches are read and preprocessed while the slide waits for the model.
        with (
            prepared,
            self.tile_feed(prepared.reader, plan) as feed,
            self.model_gate.hold(should_cancel) as admitted,
        ):
            if not admitted:
                raise JobCanceledError(
                    f"Embedding {prepared.path} was canceled while it waited for the model "
                    f"(0 of {feed.total} tiles).",
                    path=prepared.path,
                    tiles_done=0,
                    tiles_total=feed.total,
                )
            run = feed.run(
                self.encode,
                self.package.card.outputs.embedding.dim,
                progress=progress,
                should_cancel=should_cancel,
            )
        stages.seconds["read_wait"] = run.wait_s
        stages.seconds["model"] = run.model_s
        with stages("heads"):
            heads = self.run_heads(run.embeddings)
        cascade: CascadeOutcome | None = None
        if self.cascade is not None:  # K regions read at 20x, cells, context model
            with stages("cascade"):
                cascade = self.cascade.run(
                    prepared.path,
                    plan,
                    run.level0_xy,
                    run.grid_index,
                    heads,
                    out_dir,
                    should_cancel=should_cancel,
                )
        with stages("write"):
            out_dir.mkdir(parents=True, exist_ok=True)
            labels = {name: spec.labels for name, (spec, _) in self.heads.items()}
            artifacts = write_slide_files(out_dir, plan, run, heads, labels)
        result = SlideResult(
            code_version=code_version(),
            created_at=datetime.now(UTC),
            duration_s=time.perf_counter() - prepared.started,
            result_key=prepared.key,
            slide=slide_identity(plan.slide, prepared.digest, display_name),
            params=plan.params,
            options=prepared.options,
            **describe_plan(plan),
            model=self.model_ref(),
            provider=self.provider,
            providers=self.encoder.providers,
            slide_embedding=run.embeddings.mean(axis=0, dtype=np.float64).tolist(),
            predictions=heads.predictions + (cascade.predictions if cascade else []),
            artifacts=artifacts.model_copy(update=cascade.artifacts) if cascade else artifacts,
            timings={k: round(v, 6) for k, v in stages.seconds.items()},
            cascade=cascade.result if cascade else None,
        )
        with atomic_write(out_dir / "result.json") as tmp:
            tmp.write_text(result.model_dump_json(indent=2), encoding="utf-8")
        return result

    def model_ref(self) -> ModelRef:
        card = self.package.card
        return ModelRef(
            name=card.name,
            version=card.version,
            trained=card.trained,
            architecture=card.architecture.tag,
            embedding_dim=card.outputs.embedding.dim,
            variant=self.variant,
            checksums=self.package.checksums(),
            card_sha256=self.package.card_sha256,
        )


def _no_tissue(path: Path, plan: SlidePlan) -> NoTissueError:
    qc = plan.qc
    notes = f" QC: {'; '.join(qc.warnings)}." if qc.warnings else ""
    if qc.tiles_total == 0:
        side_um = plan.grid.tile_px * plan.grid.target_mpp
        return NoTissueError(
            f"{path} is smaller than one tile ({plan.grid.tile_px} px at "
            f"{plan.grid.target_mpp:g} um/px = {side_um:g} um a side), so no tile can be read; "
            f"check the mpp (--mpp) or use a model with smaller tiles.{notes}",
            path=path,
            qc=qc.to_dict(),
        )
    return NoTissueError(
        f"{path}: none of the {qc.tiles_total} tiles at {plan.grid.target_mpp:g} um/px has a "
        f"tissue fraction of {plan.grid.tissue_threshold:g} or more (tissue found: "
        f"{qc.tissue_area_mm2:.3f} mm2 by {plan.tissue.method!r}); check the slide is not blank "
        f"or lower tissue_threshold.{notes}",
        path=path,
        qc=qc.to_dict(),
    )
