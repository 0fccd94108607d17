"""The inference engine: one model package loaded once, slides in, result files out.

    slide -> open_slide -> plan_slide (mpp, level, tissue, grid, QC)
          -> [reader thread] iter_tile_batches -> preprocess -> bounded queue
          -> [caller thread] encoder session, batch after batch -> tile embeddings [N, D]
          -> tile heads (per tile) and slide heads (on the bag) -> result files

A pipeline, not a loop: a producer thread pulls tile batches from the core's parallel reader
(which itself keeps ``queue_depth`` batches in flight) and turns them into model input while the
session runs the previous batch; the queue between them holds at most ``queue_depth`` batches,
so memory is bounded whatever the slide size (only the [N, D] embeddings grow with the slide).
Progress is reported and cancellation checked between batches.

A service worker keeps one ``Engine`` for its life (``Engine.from_dir``) and calls
``embed_slide`` per job.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from xmag.digest import SlideDigest, slide_digest
from xmag.errors import JobCanceledError, NoTissueError, XmagUsageError
from xmag.outputs import (
    render_heatmap,
    tile_features_geojson,
    write_features,
    write_geojson,
    write_heatmap,
)
from xmag.outputs._atomic import atomic_write
from xmag.package import HeadSpec, ModelPackage, load_package
from xmag.params import SlideOptions
from xmag.plan import SlidePlan, plan_slide
from xmag.preprocess import Preprocessor
from xmag.readers import SlideReader, open_slide
from xmag.results import (
    Artifacts,
    HeadPrediction,
    ModelRef,
    SlideResult,
    describe_plan,
    slide_identity,
)
from xmag.runtime import ModelSession
from xmag.settings import EngineSettings
from xmag.store import ResultIdentity
from xmag.tiles import iter_tile_batches
from xmag.version import code_version

__all__ = ["Engine", "PipelineRun", "SlideOptions", "SlideResult"]

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]
_QUEUE_POLL_S = 0.1  # how often a blocked producer re-checks the stop flag


@dataclass
class PipelineRun:
    """Tile embeddings of one slide and what the pipeline spent on them.

    Attributes:
        embeddings: (N, D) float32, kept tiles in grid order.
        level0_xy: (N, 2) int64 top-left of each tile in level-0 pixels.
        grid_index: (N,) int64 index of each tile in the grid.
        model_s: seconds the caller thread spent in the encoder.
        wait_s: seconds the caller thread waited for tiles (the model was idle).
        produce_s: seconds the producer thread spent reading and preprocessing (overlapped).
        batches: model calls.
    """

    embeddings: np.ndarray
    level0_xy: np.ndarray
    grid_index: np.ndarray
    model_s: float = 0.0
    wait_s: float = 0.0
    produce_s: float = 0.0
    batches: int = 0


@dataclass
class _Failure:
    exc: BaseException


_DONE = object()


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
        self.settings = settings or EngineSettings()
        card = package.card
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
        b, t = card.runtime.batch, card.input.tile_px
        self.encoder = ModelSession(
            package.root / encoder_file,
            self.settings,
            trt_profile={card.input.name: (b.min, b.opt, b.max, 3, t, t)},
        )
        # Heads are small and take a bag of any length: no TensorRT profile fits them.
        self.heads: dict[str, tuple[HeadSpec, ModelSession]] = {
            h.name: (h, ModelSession(package.head_path(h), self.settings, allow_tensorrt=False))
            for h in card.heads
        }
        self.provider = self.encoder.provider
        self.batch_size = self.settings.batch_size
        if self.provider == "tensorrt":  # a batch outside the profile would rebuild the engine
            self.batch_size = min(self.batch_size, b.max)
        self.preprocess = Preprocessor.from_spec(card.input)
        self.tiles_embedded = 0

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
            res = self.encoder.run(
                {card.input.name: batch[i : i + self.batch_size]}, [card.outputs.embedding.name]
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
        """Embed every kept tile of ``plan`` read through ``reader``.

        Raises:
            JobCanceledError: ``should_cancel()`` returned True between two batches.
            RegionReadError and other XmagError: from the reads, re-raised in this thread.
        """
        indices = plan.grid.kept_indices()
        total = int(indices.shape[0])
        dim = self.package.card.outputs.embedding.dim
        run = PipelineRun(
            np.empty((total, dim), np.float32),
            np.empty((total, 2), np.int64),
            np.empty((total,), np.int64),
        )
        q: queue.Queue[Any] = queue.Queue(maxsize=self.settings.queue_depth)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=_QUEUE_POLL_S)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            t0 = time.perf_counter()
            batches = None
            try:
                batches = iter_tile_batches(
                    reader,
                    plan.grid,
                    plan.level,
                    indices=indices,
                    batch_size=self.batch_size,
                    workers=self.settings.reader_workers,
                    max_pending=self.settings.queue_depth,
                )
                for b in batches:
                    item = (b.indices, b.level0_xy, self.preprocess(b.pixels))
                    if not put(item):
                        return
                run.produce_s = time.perf_counter() - t0
                put(_DONE)
            except BaseException as exc:  # handed to the caller's thread, re-raised there
                put(_Failure(exc))
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()  # joins the reader threads, also when stopped early

        producer = threading.Thread(target=produce, name="xmag-engine-producer", daemon=True)
        done = 0
        if progress is not None:
            progress(0, total)
        producer.start()
        try:
            while True:
                if should_cancel is not None and should_cancel():
                    raise JobCanceledError(
                        f"Embedding {reader.path} was canceled after {done} of {total} tiles.",
                        path=reader.path,
                        tiles_done=done,
                        tiles_total=total,
                    )
                t0 = time.perf_counter()
                item = q.get()
                t1 = time.perf_counter()
                run.wait_s += t1 - t0
                if item is _DONE:
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                idx, xy, x = item
                emb = self.encode(x)
                run.model_s += time.perf_counter() - t1
                n = idx.shape[0]
                run.embeddings[done : done + n] = emb
                run.level0_xy[done : done + n] = xy
                run.grid_index[done : done + n] = idx
                done += n
                run.batches += 1
                if progress is not None:
                    progress(done, total)
        finally:
            stop.set()
            with contextlib.suppress(queue.Empty):
                while True:  # unblock a producer waiting on a full queue
                    q.get_nowait()
            producer.join()
        if done != total:
            raise XmagUsageError(f"pipeline produced {done} tiles, expected {total}")
        return run

    # -- heads ------------------------------------------------------------------------------
    def run_heads(
        self, embeddings: np.ndarray
    ) -> tuple[list[HeadPrediction], dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Every head on the tile embeddings.

        Returns (predictions, tile probabilities by tile head [N, C], attention by slide head [N]).
        """
        preds: list[HeadPrediction] = []
        tile_probs: dict[str, np.ndarray] = {}
        attention: dict[str, np.ndarray] = {}
        for name, (spec, session) in self.heads.items():
            if spec.level == "slide":
                wanted = [spec.probabilities, *([spec.attention] if spec.attention else [])]
                out = session.run({spec.input: embeddings}, wanted)
                probs = np.asarray(out[spec.probabilities], np.float64).reshape(-1)
                if spec.attention:
                    attention[name] = np.asarray(out[spec.attention], np.float32).reshape(-1)
                preds.append(_prediction(spec, probs, None))
            else:
                chunks = [
                    session.run({spec.input: embeddings[i : i + self.batch_size]})[
                        spec.probabilities
                    ]
                    for i in range(0, embeddings.shape[0], self.batch_size)
                ]
                p = np.concatenate(chunks).astype(np.float32)
                tile_probs[name] = p
                winners = np.bincount(p.argmax(axis=1), minlength=len(spec.labels))
                counts = {lab: int(c) for lab, c in zip(spec.labels, winners, strict=True)}
                preds.append(_prediction(spec, p.mean(axis=0, dtype=np.float64), counts))
        return preds, tile_probs, attention

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

        Args:
            digest: the slide's sha256 and size when the caller knows them (an upload's, or
                ``xmag.digest.DigestCache``); hashed here otherwise (the ``hash`` timing).
            display_name: the slide's name as the caller knows it (default: the file name).

        Raises:
            SlideError subclasses: the slide cannot be read, has no usable mpp, or
                (``NoTissueError``) no tile passes the tissue threshold; ``qc`` in its fields.
            JobCanceledError: ``should_cancel()`` returned True between two batches.
            InferenceError: ONNX Runtime failed.
        """
        started = time.perf_counter()
        stages = _Stages()
        slide_path, out_dir = Path(slide_path), Path(out_dir)
        options = options or SlideOptions()
        params = self.package.card.tiling_params(options)
        with stages("open"):
            reader = open_slide(slide_path)  # typed errors for missing or unreadable input
        with reader:
            if digest is None:
                with stages("hash"):
                    digest = slide_digest(slide_path)
            key = self.result_key(digest.sha256, options)
            with stages("plan"):
                plan = plan_slide(reader, params)
            if plan.qc.zero_tissue or plan.grid.n_kept == 0:
                raise _no_tissue(slide_path, plan)
            run = self.run_pipeline(reader, plan, progress=progress, should_cancel=should_cancel)
        stages.seconds["read_wait"] = run.wait_s
        stages.seconds["model"] = run.model_s
        with stages("heads"):
            preds, tile_probs, attention = self.run_heads(run.embeddings)
        with stages("write"):
            artifacts = self._write_outputs(out_dir, plan, run, tile_probs, attention)
        result = SlideResult(
            code_version=code_version(),
            created_at=datetime.now(UTC),
            duration_s=time.perf_counter() - started,
            result_key=key,
            slide=slide_identity(plan.slide, digest, display_name),
            params=params,
            options=options,
            **describe_plan(plan),
            model=self.model_ref(),
            provider=self.provider,
            providers=self.encoder.providers,
            slide_embedding=run.embeddings.mean(axis=0, dtype=np.float64).tolist(),
            predictions=preds,
            artifacts=artifacts,
            timings={k: round(v, 6) for k, v in stages.seconds.items()},
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

    def _write_outputs(
        self,
        out_dir: Path,
        plan: SlidePlan,
        run: PipelineRun,
        tile_probs: dict[str, np.ndarray],
        attention: dict[str, np.ndarray],
    ) -> Artifacts:
        out_dir.mkdir(parents=True, exist_ok=True)
        level0_tile = float(plan.grid.level0_tile)
        dims = tuple(int(v) for v in plan.slide.dimensions)
        write_features(
            out_dir / "features.h5",
            features=run.embeddings,
            coords=run.level0_xy,
            grid_index=run.grid_index,
            tile_px=plan.grid.tile_px,
            level0_tile_px=level0_tile,
            patch_level=plan.level.level,
            mpp=plan.mpp.mpp,
            target_mpp=plan.grid.target_mpp,
            level0_size=(dims[0], dims[1]),
            scores=tile_probs,
            attention=attention,
        )
        values, what, title = self._heatmap_values(run.embeddings, tile_probs, attention)
        image = render_heatmap(
            plan.tissue.thumbnail,
            float(plan.tissue.downsample),
            plan.tissue.mask,
            run.level0_xy,
            level0_tile,
            values,
            title,
        )
        write_heatmap(out_dir / "heatmap.png", image)
        labelled = {n: (self.heads[n][0].labels, p) for n, p in tile_probs.items()}
        collection = tile_features_geojson(
            run.level0_xy,
            level0_tile,
            (dims[0], dims[1]),
            grid_index=run.grid_index,
            scores=labelled,
            attention=attention,
        )
        write_geojson(out_dir / "tiles.geojson", collection)
        return Artifacts(heatmap_values=what)

    def _heatmap_values(
        self,
        embeddings: np.ndarray,
        tile_probs: dict[str, np.ndarray],
        attention: dict[str, np.ndarray],
    ) -> tuple[np.ndarray, str, str]:
        """What the heatmap colours: a slide head's attention, else a tile head's last label,
        else each tile's cosine similarity to the slide embedding.

        Returns (values [N], machine name for result.json, title printed on the picture).
        """
        if attention:
            name, att = next(iter(attention.items()))
            return att, f"attention:{name}", f"attention of slide head '{name}'"
        if tile_probs:
            name, p = next(iter(tile_probs.items()))
            label = self.heads[name][0].labels[-1]
            return p[:, -1], f"{name}:{label}", f"tile head '{name}': p({label})"
        mean = embeddings.mean(axis=0)
        norms = np.linalg.norm(embeddings, axis=1) * max(float(np.linalg.norm(mean)), 1e-12)
        cos = embeddings @ mean / np.maximum(norms, 1e-12)
        return cos, "cosine:slide_embedding", "cosine similarity to the slide embedding"


def _prediction(spec: HeadSpec, probs: np.ndarray, counts: dict[str, int] | None) -> HeadPrediction:
    return HeadPrediction(
        name=spec.name,
        level=spec.level,
        kind=spec.kind,
        labels=list(spec.labels),
        probabilities={lab: float(v) for lab, v in zip(spec.labels, probs, strict=True)},
        top_label=spec.labels[int(np.argmax(probs))],
        tile_label_counts=counts,
        attention=spec.attention is not None,
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
