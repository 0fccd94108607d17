"""Task heads on a slide's tile embeddings: tile heads score each tile, slide heads the bag.

A head is a small ONNX graph named in the package card (``HeadSpec``). Tile heads run in chunks
of the encoder's batch size and report the mean probabilities and how many tiles each label won;
slide heads (attention MIL) take the whole bag of any length and may return per-tile attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from xmag.package import HeadSpec, ModelPackage
from xmag.results import HeadPrediction
from xmag.runtime import ModelSession
from xmag.settings import EngineSettings

__all__ = ["HeadOutputs", "HeadSet"]


@dataclass
class HeadOutputs:
    """What the heads said about one slide.

    Attributes:
        predictions: one per head, in card order.
        tile_probs: tile head -> (N, C) float32 probabilities per tile.
        attention: slide head -> (N,) float32 attention per tile.
    """

    predictions: list[HeadPrediction] = field(default_factory=list)
    tile_probs: dict[str, np.ndarray] = field(default_factory=dict)
    attention: dict[str, np.ndarray] = field(default_factory=dict)

    def labels(self, heads: HeadSet) -> dict[str, tuple[list[str], np.ndarray]]:
        """tile head -> (its labels, its (N, C) probabilities)."""
        return {n: (list(heads[n][0].labels), p) for n, p in self.tile_probs.items()}


class HeadSet(dict[str, tuple[HeadSpec, ModelSession]]):
    """The package's heads by name, each with its session (heads never run on TensorRT: a bag
    of any length fits no engine profile)."""

    @classmethod
    def load(cls, package: ModelPackage, settings: EngineSettings) -> HeadSet:
        return cls(
            (h.name, (h, ModelSession(package.head_path(h), settings, allow_tensorrt=False)))
            for h in package.card.heads
        )

    def run(self, embeddings: np.ndarray, batch_size: int) -> HeadOutputs:
        """Every head on the (N, D) tile embeddings (tile heads in chunks of ``batch_size``)."""
        out = HeadOutputs()
        for name, (spec, session) in self.items():
            if spec.level == "slide":
                wanted = [spec.probabilities, *([spec.attention] if spec.attention else [])]
                res = session.run({spec.input: embeddings}, wanted)
                probs = np.asarray(res[spec.probabilities], np.float64).reshape(-1)
                if spec.attention:
                    out.attention[name] = np.asarray(res[spec.attention], np.float32).reshape(-1)
                out.predictions.append(_prediction(spec, probs, None))
            else:
                chunks = [
                    session.run({spec.input: embeddings[i : i + batch_size]})[spec.probabilities]
                    for i in range(0, embeddings.shape[0], batch_size)
                ]
                p = np.concatenate(chunks).astype(np.float32)
                out.tile_probs[name] = p
                winners = np.bincount(p.argmax(axis=1), minlength=len(spec.labels))
                counts = {lab: int(c) for lab, c in zip(spec.labels, winners, strict=True)}
                out.predictions.append(_prediction(spec, p.mean(axis=0, dtype=np.float64), counts))
        return out


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
