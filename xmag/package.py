"""Model packages: a folder with ONNX files and a versioned card (``model.json``).

    models/default/
        model.json          the card (``ModelCard``): what the model reads and returns
        model.onnx          tile encoder, input [B, 3, tile_px, tile_px], dynamic batch axis
        heads/<name>.onnx   zero or more task heads (tile level or slide level)

Loading (``load_package``) validates the card, checks the sha256 of every listed file and checks
that the ONNX graphs' input and output names and shapes agree with the card, so a mismatched or
half-copied package fails at load with a message naming the file, never in the middle of a job.
Preprocessing is derived from the card (``InputSpec``), never hard-coded by the caller.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xmag.errors import ChecksumMismatchError, ModelPackageError
from xmag.params import SlideOptions, TilingParams
from xmag.preprocess import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "CARD_FILENAME",
    "CARD_SCHEMA_VERSION",
    "CASCADE_CHECKSUM_KEY",
    "CELL_MODEL_INPUTS",
    "Architecture",
    "BatchProfile",
    "CascadeSpec",
    "CellModelIO",
    "EmbeddingOutput",
    "FileEntry",
    "HeadSpec",
    "InputSpec",
    "ModelCard",
    "ModelPackage",
    "OutputSpec",
    "RegionSelection",
    "RuntimeHints",
    "SentenceSpec",
    "Variant",
    "load_package",
    "sha256_file",
]

CARD_FILENAME = "model.json"
#: Key of the cascade section's sha256 in ``ModelCard.checksums`` (not a file).
CASCADE_CHECKSUM_KEY = "model.json#cascade"
CARD_SCHEMA_VERSION = 1  # bump on any incompatible change of ModelCard
SUPPORTED_CARD_VERSIONS = frozenset({1})
_HASH_CHUNK = 1 << 20  # bytes read at a time when hashing (1 MiB)
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(_Strict):
    """What network the encoder is (for people and provenance, not used to build anything)."""

    tag: str = Field(description="architecture name, timm style (e.g. vit_base_patch14_dinov2)")
    params_m: float | None = Field(default=None, ge=0, description="parameters in millions")
    notes: str = ""


class BatchProfile(_Strict):
    """Batch sizes the encoder is built for (TensorRT optimisation profile: min/opt/max)."""

    min: int = Field(default=1, ge=1)
    opt: int = Field(default=32, ge=1)
    max: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> BatchProfile:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile needs min <= opt <= max, got {self}")
        return self


class InputSpec(_Strict):
    """The encoder's input and how tiles are turned into it.

    Pixels go uint8 RGB [B, tile_px, tile_px, 3] -> ``dtype`` [B, 3, tile_px, tile_px] as
    ``(x / 255 - mean) / std`` per channel, channels in ``channel_order``.
    """

    name: str = Field(default="pixels", description="ONNX input name")
    tile_px: int = Field(
        default=224, ge=16, le=4096, description="tile side in pixels at target_mpp"
    )
    target_mpp: float = Field(
        default=2.0, gt=0, le=100, description="um/px the model was trained at"
    )
    channel_order: Literal["RGB", "BGR"] = "RGB"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dtype: Literal["float32", "float16"] = "float32"

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError(f"std must be positive per channel, got {v}")
        return v


class EmbeddingOutput(_Strict):
    name: str = Field(default="embedding", description="ONNX output name, shape [B, dim]")
    dim: int = Field(ge=1, description="embedding length")


class OutputSpec(_Strict):
    embedding: EmbeddingOutput
    patch_tokens: str | None = Field(
        default=None, description="ONNX output name of the patch tokens [B, T, dim], when exported"
    )


class HeadSpec(_Strict):
    """A task head with its own ONNX file.

    Tile heads take ``input`` [B, dim] and return ``probabilities`` [B, len(labels)]. Slide heads
    take the bag ``input`` [N, dim] and return ``probabilities`` [len(labels)] and, optionally,
    ``attention`` [N] (one weight per tile, summing to 1).
    """

    name: str = Field(pattern=_NAME_PATTERN)
    level: Literal["tile", "slide"]
    labels: list[str] = Field(min_length=1)
    file: str = Field(description="ONNX file, relative to the package folder")
    kind: str = Field(default="", description="e.g. gated_attention_mil, linear")
    input: str = "embeddings"
    probabilities: str = "probabilities"
    attention: str | None = None
    description: str = ""

    @model_validator(mode="after")
    def _attention_only_on_slide(self) -> HeadSpec:
        if self.attention is not None and self.level != "slide":
            raise ValueError(f"head {self.name!r}: only slide heads return attention")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"head {self.name!r}: labels must be unique, got {self.labels}")
        return self


class FileEntry(_Strict):
    path: str = Field(description="relative to the package folder, '/' separated")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int | None = Field(default=None, ge=0)

    @field_validator("path")
    @classmethod
    def _inside(cls, v: str) -> str:
        p = PurePosixPath(v)
        if p.is_absolute() or ".." in p.parts or not p.parts:
            raise ValueError(f"file path {v!r} must be relative and inside the package")
        return v


class Variant(_Strict):
    """An alternative encoder file (fp16, int8...) and the providers it is meant for."""

    name: str = Field(pattern=_NAME_PATTERN)
    file: str
    precision: Literal["fp32", "fp16", "int8"]
    providers: list[str] = Field(default_factory=list)


class RuntimeHints(_Strict):
    batch: BatchProfile = Field(default_factory=lambda: BatchProfile())
    trt_fp16: bool = True
    trt_workspace_mb: int | None = Field(default=None, ge=1)


class RegionSelection(_Strict):
    """How the cascade picks the regions it reads at cell resolution from the 5x pass.

    ``tile_head``: highest probability of ``label`` (default: the last label) of tile head
    ``head``; ``slide_attention``: highest attention weight of slide head ``head``; ``tissue``:
    highest tissue fraction of the tile (no head needed).
    """

    rule: Literal["tile_head", "slide_attention", "tissue"] = "tissue"
    head: str | None = Field(default=None, description="head read by tile_head/slide_attention")
    label: str | None = Field(default=None, description="tile_head: label whose score is used")

    @model_validator(mode="after")
    def _head_when_needed(self) -> RegionSelection:
        if self.rule != "tissue" and self.head is None:
            raise ValueError(f"region selection rule {self.rule!r} needs a head name")
        if self.label is not None and self.rule != "tile_head":
            raise ValueError("a selection label is only read by the tile_head rule")
        return self


class SentenceSpec(_Strict):
    """How the cells of the regions read become the context model's sentences (the serving
    twin of ``training.celleconet.config.SentenceConfig``): each region is cut into n x n
    squares, n = ``round(size_um / region_um)``, of at most ``max_cells`` cells; phrases of
    ``k_neighbours`` within ``radius_um`` (``xmag.cascade.sentences``)."""

    region_um: float = Field(default=100.0, gt=0, le=10_000)
    max_cells: int = Field(default=64, ge=4, le=4096)
    min_cells: int = Field(default=8, ge=1)
    max_regions: int = Field(default=512, ge=1, le=65_536)
    k_neighbours: int = Field(default=6, ge=1, le=64)
    radius_um: float = Field(default=30.0, gt=0)
    seed: int = 0


#: Input names of a cell model graph, in order (``training.celleconet.train.MODEL_INPUTS``).
CELL_MODEL_INPUTS: tuple[str, ...] = (
    "words",
    "types",
    "xy_um",
    "nbr_index",
    "nbr_mask",
    "cell_mask",
    "region_mask",
)


class CellModelIO(_Strict):
    """The context model's ONNX file and tensor names.

    Inputs (B slides, R sentences, M cells, K neighbours; B, R, M dynamic, K fixed):
    ``words``, ``types`` int64 [B, R, M]; ``xy_um`` float32 [B, R, M, 2] (um from the sentence
    centre); ``nbr_index`` int64 [B, R, M, K] (slots in the same sentence); ``nbr_mask`` bool
    [B, R, M, K]; ``cell_mask`` bool [B, R, M]; ``region_mask`` bool [B, R]. Outputs: ``risk``
    float32 [B] (log relative hazard), ``probability`` float32 [B] (recurrence within the
    horizon), ``region_attention`` float32 [B, R], ``cell_attention`` float32 [B, R, M].
    """

    file: str = Field(default="celleconet.onnx", description="relative to the package folder")
    inputs: tuple[str, ...] = CELL_MODEL_INPUTS
    risk: str = "risk"
    probability: str = "p5y"
    region_attention: str = "region_attention"
    cell_attention: str = "cell_attention"

    @field_validator("inputs")
    @classmethod
    def _seven(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) != len(CELL_MODEL_INPUTS) or len(set(v)) != len(v):
            raise ValueError(
                f"inputs names the {len(CELL_MODEL_INPUTS)} inputs {CELL_MODEL_INPUTS} in "
                f"that order, got {v}"
            )
        return v


class CascadeSpec(_Strict):
    """A second, cell-level model run after the 5x pass (``xmag.cascade``).

    From the 5x pass pick ``k`` square fields of ``size_um`` (``select``), read only those at
    ``read_mpp`` through the tile reader, detect and measure nuclei (``xmag.cells``, with
    ``detector`` overrides of ``DetectorParams``), turn cells into words (``vocabulary``, a
    ``xmag.celleconet.codebook/1`` JSON) and sentences (``sentences``), and run ``model``.
    """

    kind: Literal["celleconet"] = "celleconet"
    task: str = Field(
        default="recurrence_risk", pattern=_NAME_PATTERN, description="task name in results"
    )
    select: RegionSelection = Field(default_factory=lambda: RegionSelection())
    k: int = Field(default=32, ge=1, le=4096, description="regions read at cell resolution")
    size_um: float = Field(default=256.0, gt=0, le=4096, description="side of a region in um")
    read_mpp: float = Field(default=0.5, gt=0, le=10, description="um/px regions are read at")
    detector: dict[str, float | tuple[float, ...]] = Field(
        default_factory=dict, description="overrides of xmag.cells.detect.DetectorParams"
    )
    max_cells_per_region: int = Field(default=4096, ge=1, le=1_000_000)
    vocabulary: str = Field(default="vocabulary.json", description="codebook JSON file")
    model: CellModelIO = Field(default_factory=lambda: CellModelIO())
    sentences: SentenceSpec = Field(default_factory=lambda: SentenceSpec())
    horizon_years: float = Field(default=5.0, gt=0, description="horizon of the probability")

    @property
    def region_px(self) -> int:
        """Side of a region in pixels at ``read_mpp``."""
        return max(1, round(self.size_um / self.read_mpp))


class ModelCard(_Strict):
    """``model.json``: everything the engine needs to know about a package."""

    schema_version: int = CARD_SCHEMA_VERSION
    name: str = Field(pattern=_NAME_PATTERN)
    version: str = Field(min_length=1)
    trained: bool = Field(description="false for placeholders whose outputs mean nothing")
    description: str
    architecture: Architecture
    input: InputSpec
    outputs: OutputSpec
    encoder: str = Field(default="model.onnx", description="encoder ONNX file (fp32 reference)")
    files: list[FileEntry] = Field(min_length=1)
    heads: list[HeadSpec] = Field(default_factory=list)
    variants: list[Variant] = Field(default_factory=list)
    runtime: RuntimeHints = Field(default_factory=lambda: RuntimeHints())
    license: str = ""
    intended_use: str = ""
    cascade: CascadeSpec | None = Field(
        default=None, description="cell-level model run after the 5x pass (kind celleconet)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        listed = {f.path for f in self.files}
        if len(listed) != len(self.files):
            raise ValueError("files lists a path twice")
        needed = [self.encoder, *(h.file for h in self.heads), *(v.file for v in self.variants)]
        if self.cascade is not None:
            needed += [self.cascade.vocabulary, self.cascade.model.file]
        missing = [p for p in needed if p not in listed]
        if missing:
            raise ValueError(f"files must list every ONNX file with its sha256; missing {missing}")
        names = [h.name for h in self.heads]
        if len(set(names)) != len(names):
            raise ValueError(f"head names must be unique, got {names}")
        if self.cascade is not None:
            self._check_selection(self.cascade)
        return self

    def _check_selection(self, cascade: CascadeSpec) -> None:
        if cascade.task in {h.name for h in self.heads}:
            raise ValueError(f"cascade task {cascade.task!r} has the name of a head")
        sel = cascade.select
        if sel.rule == "tissue":
            return
        head = next((h for h in self.heads if h.name == sel.head), None)
        if head is None:
            raise ValueError(
                f"cascade.select.head {sel.head!r} is not a head of this card "
                f"(heads: {[h.name for h in self.heads]})"
            )
        if sel.rule == "tile_head" and head.level != "tile":
            raise ValueError(
                f"cascade.select rule tile_head needs a tile head; {head.name!r} is a slide head"
            )
        if sel.rule == "tile_head" and sel.label is not None and sel.label not in head.labels:
            raise ValueError(
                f"cascade.select.label {sel.label!r} is not a label of "
                f"{head.name!r} ({head.labels})"
            )
        if sel.rule == "slide_attention" and head.attention is None:
            raise ValueError(
                f"cascade.select rule slide_attention needs a slide head with "
                f"attention; {head.name!r} returns none"
            )

    @property
    def tasks(self) -> list[str]:
        """Task names a job may ask for: every head, then the cascade's task."""
        return [h.name for h in self.heads] + ([self.cascade.task] if self.cascade else [])

    def tiling_params(self, options: SlideOptions | None = None) -> TilingParams:
        """Tiling parameters this model asks for (tile_px, target_mpp), plus caller options
        (an option left None keeps the model's default)."""
        given = (options or SlideOptions()).model_dump(exclude_none=True)
        return TilingParams(tile_px=self.input.tile_px, target_mpp=self.input.target_mpp, **given)

    def checksums(self) -> dict[str, str]:
        """sha256 of every file by path (what identifies the model in result provenance).

        A card with a cascade adds ``CASCADE_CHECKSUM_KEY``: the sha256 of its cascade section
        (K, region size, detector...), which changes results without changing any file.
        """
        sums = {f.path: f.sha256 for f in sorted(self.files, key=lambda f: f.path)}
        if self.cascade is not None:
            section = json.dumps(self.cascade.model_dump(mode="json"), sort_keys=True)
            sums[CASCADE_CHECKSUM_KEY] = hashlib.sha256(section.encode()).hexdigest()
        return sums


@dataclass(frozen=True)
class ModelPackage:
    """A loaded, verified package: its folder, card and the absolute ONNX paths."""

    root: Path
    card: ModelCard

    @property
    def encoder_path(self) -> Path:
        return self.root / self.card.encoder

    def head_path(self, head: HeadSpec) -> Path:
        return self.root / head.file

    def checksums(self) -> dict[str, str]:
        return self.card.checksums()

    @property
    def card_sha256(self) -> str:
        """sha256 of the canonical card JSON (changes with any card field)."""
        data = json.dumps(self.card.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def load_package(model_dir: str | Path) -> ModelPackage:
    """Load and verify a model package folder.

    Raises:
        ModelPackageError: no folder or card, a card that is not valid JSON or fails the schema,
            an unsupported ``schema_version``, a listed file missing, or ONNX input/output names
            or shapes that disagree with the card.
        ChecksumMismatchError: a file's sha256 differs from the card.
    """
    root = Path(model_dir).resolve()
    card = _read_card(root)
    _check_files(root, card)
    _check_encoder(root, card)
    for head in card.heads:
        _check_head(root, card, head)
    if card.cascade is not None:
        _check_cascade(root, card.cascade)
    return ModelPackage(root, card)


def _read_card(root: Path) -> ModelCard:
    card_path = root / CARD_FILENAME
    if not root.is_dir():
        raise ModelPackageError(
            f"Model package {root} is not a folder; pass the folder that holds {CARD_FILENAME} "
            "(build the default one with `make model`).",
            path=root,
        )
    if not card_path.is_file():
        raise ModelPackageError(
            f"{card_path} is missing; a model package needs its card (build the default package "
            "with `make model` or export one with model_export).",
            path=card_path,
        )
    try:
        raw = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelPackageError(
            f"{card_path} is not valid JSON ({exc}); re-export the package.", path=card_path
        ) from exc
    if not isinstance(raw, dict):
        raise ModelPackageError(f"{card_path} must hold a JSON object.", path=card_path)
    version = raw.get("schema_version")
    if version not in SUPPORTED_CARD_VERSIONS:
        raise ModelPackageError(
            f"{card_path} has schema_version {version!r}, which this xmag does not read "
            f"(supported: {sorted(SUPPORTED_CARD_VERSIONS)}); upgrade xmag or re-export the "
            "package with this version's model_export.",
            path=card_path,
            schema_version=str(version),
        )
    try:
        return ModelCard.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(card)'}: {e['msg']}" for e in exc.errors()
        )
        raise ModelPackageError(
            f"{card_path} does not match the model card schema: {problems}. Fix the card or "
            "re-export the package.",
            path=card_path,
        ) from exc


def _check_files(root: Path, card: ModelCard) -> None:
    for entry in card.files:
        path = root / entry.path
        if not path.is_file():
            raise ModelPackageError(
                f"{path} is listed in {CARD_FILENAME} but missing; copy the whole package "
                "folder again.",
                path=path,
            )
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise ChecksumMismatchError(
                f"{path} has sha256 {actual} but {CARD_FILENAME} says {entry.sha256}; the file "
                "is damaged or from another export: copy the package again or re-export it.",
                path=path,
                expected=entry.sha256,
                actual=actual,
            )


@dataclass(frozen=True)
class _Tensor:
    name: str
    elem_type: int
    shape: tuple[int | str | None, ...]  # int for fixed dims, str for symbolic, None unknown


def _graph_io(path: Path) -> tuple[dict[str, _Tensor], dict[str, _Tensor]]:
    """Input and output tensors of an ONNX file (weights not loaded)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends: translate at the edge
        raise ModelPackageError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); re-export it.",
            path=path,
        ) from exc
    inits = {i.name for i in model.graph.initializer}

    def info(values: Any) -> dict[str, _Tensor]:
        out = {}
        for v in values:
            if v.name in inits:
                continue
            tt = v.type.tensor_type
            dims: list[int | str | None] = []
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                elif d.HasField("dim_param"):
                    dims.append(d.dim_param)
                else:
                    dims.append(None)
            out[v.name] = _Tensor(v.name, tt.elem_type, tuple(dims))
        return out

    return info(model.graph.input), info(model.graph.output)


def _fixed(dim: int | str | None) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _shape_error(path: Path, what: str, expected: str, got: object) -> ModelPackageError:
    return ModelPackageError(
        f"{path}: {what} should be {expected} per {CARD_FILENAME} but the graph has {got}; the "
        "card and the ONNX file disagree: re-export the package.",
        path=path,
    )


def _check_encoder(root: Path, card: ModelCard) -> None:
    import onnx

    path = root / card.encoder
    inputs, outputs = _graph_io(path)
    spec = card.input
    if spec.name not in inputs or len(inputs) != 1:
        raise _shape_error(path, "the inputs", f"one input named {spec.name!r}", sorted(inputs))
    x = inputs[spec.name]
    want_type = onnx.TensorProto.FLOAT if spec.dtype == "float32" else onnx.TensorProto.FLOAT16
    if x.elem_type != want_type:
        raise _shape_error(path, f"input {spec.name!r} type", spec.dtype, x.elem_type)
    t = spec.tile_px
    if len(x.shape) != 4 or [_fixed(d) for d in x.shape[1:]] != [3, t, t]:
        raise _shape_error(path, f"input {spec.name!r} shape", f"[B, 3, {t}, {t}]", x.shape)
    if _fixed(x.shape[0]) is not None:
        raise _shape_error(path, f"input {spec.name!r} batch axis", "dynamic", x.shape)
    emb = card.outputs.embedding
    if emb.name not in outputs:
        raise _shape_error(path, "the outputs", f"an output named {emb.name!r}", sorted(outputs))
    shape = outputs[emb.name].shape
    if len(shape) != 2 or _fixed(shape[1]) != emb.dim:
        raise _shape_error(path, f"output {emb.name!r} shape", f"[B, {emb.dim}]", shape)
    tokens = card.outputs.patch_tokens
    if tokens is not None and tokens not in outputs:
        raise _shape_error(path, "the outputs", f"a patch-token output {tokens!r}", sorted(outputs))


def _check_head(root: Path, card: ModelCard, head: HeadSpec) -> None:
    path = root / head.file
    inputs, outputs = _graph_io(path)
    dim = card.outputs.embedding.dim
    if head.input not in inputs or len(inputs) != 1:
        raise _shape_error(path, "the inputs", f"one input named {head.input!r}", sorted(inputs))
    shape = inputs[head.input].shape
    if len(shape) != 2 or _fixed(shape[1]) != dim:
        lead = "N" if head.level == "slide" else "B"
        raise _shape_error(path, f"input {head.input!r} shape", f"[{lead}, {dim}]", shape)
    if head.probabilities not in outputs:
        raise _shape_error(
            path, "the outputs", f"an output named {head.probabilities!r}", sorted(outputs)
        )
    probs = outputs[head.probabilities].shape
    n_labels = len(head.labels)
    want_rank = 1 if head.level == "slide" else 2
    if len(probs) != want_rank or _fixed(probs[-1]) not in (None, n_labels):
        want = f"[{n_labels}]" if head.level == "slide" else f"[B, {n_labels}]"
        raise _shape_error(path, f"output {head.probabilities!r} shape", want, probs)
    if head.attention is not None:
        if head.attention not in outputs:
            raise _shape_error(
                path, "the outputs", f"an output named {head.attention!r}", sorted(outputs)
            )
        att = outputs[head.attention].shape
        if len(att) != 1:
            raise _shape_error(path, f"output {head.attention!r} shape", "[N]", att)


def _check_cascade(root: Path, cascade: CascadeSpec) -> None:
    """The cascade's detector overrides, vocabulary and cell model agree with the card."""
    from dataclasses import fields

    from xmag.cascade.vocabulary import Vocabulary
    from xmag.cells.detect import DetectorParams

    known = {f.name for f in fields(DetectorParams)}
    unknown = sorted(set(cascade.detector) - known)
    if unknown:
        raise ModelPackageError(
            f"{root / CARD_FILENAME}: cascade.detector has unknown parameters {unknown}; "
            f"choose from {sorted(known)}.",
            path=root / CARD_FILENAME,
        )
    vocab_path = root / cascade.vocabulary
    try:
        vocab = Vocabulary.load(vocab_path)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ModelPackageError(
            f"{vocab_path} is not a cell vocabulary ({exc}); re-export the package.",
            path=vocab_path,
        ) from exc
    path = root / cascade.model.file
    inputs, outputs = _graph_io(path)
    io = cascade.model
    if set(inputs) != set(io.inputs):
        raise _shape_error(path, "the inputs", f"the inputs {list(io.inputs)}", sorted(inputs))
    ranks = dict(zip(io.inputs, (3, 3, 4, 4, 4, 3, 2), strict=True))
    for name, rank in ranks.items():
        if len(inputs[name].shape) != rank:
            raise _shape_error(path, f"input {name!r} rank", str(rank), inputs[name].shape)
    k = _fixed(inputs[io.inputs[3]].shape[-1])
    if k is not None and k != cascade.sentences.k_neighbours:
        raise _shape_error(
            path, f"input {io.inputs[3]!r} neighbours", str(cascade.sentences.k_neighbours), k
        )
    wanted = (io.risk, io.probability, io.region_attention, io.cell_attention)
    missing = [n for n in wanted if n not in outputs]
    if missing:
        raise _shape_error(path, "the outputs", f"outputs named {list(wanted)}", sorted(outputs))
    del vocab  # loading it is the check
