"""PyTorch -> ONNX for the tile encoder and the slide heads (torch.export-based exporter).

Why this exporter and opset: torch 2.14's default (``dynamo=True``) traces with ``torch.export``
and emits a clean graph (Conv, MatMul, Softmax, LayerNormalization, Erf...) with no data-dependent
shape ops around attention, which TensorRT parses into one engine; the legacy TorchScript exporter
is deprecated and adds Shape/Where chains. Opset 18 is the newest that ONNX Runtime's TensorRT
(10.x) and CUDA providers, and its CPU int8 quantizer, all handle: it has native
LayerNormalization, and no opset-23 Attention op that older TensorRT parsers reject.

Graphs (names are part of the package card):

    encoder: pixels float32 [batch, 3, H, W] (normalised RGB)
             -> embedding float32 [batch, D] (final-normed CLS)
             (-> patch_tokens float32 [batch, H/p * W/p, D], optional)
    MIL head: bag float32 [n_tiles, D] -> probabilities float32 [C], attention float32 [n_tiles]

ONNX Runtime's fused operators (``export_encoder(..., ort_fused=True)``): each timm attention
block is written as one ``com.microsoft::Attention`` node (QKV projection, scaled dot product,
softmax and head merge), each exact GELU as ``com.microsoft::Gelu``, and each timm block's
LayerScale is folded into the Linear before it (``diag(g) (W x + b) = (diag(g) W) x + g b``, exact
in real arithmetic; ORT's CPU fuser leaves the Mul in place). That graph is the source of the CPU
int8 variant: ``quantize_dynamic`` turns the Attention nodes into ``QAttention`` (int8
QKV projection inside ORT's own attention kernel), and the fused GELU lets ORT fold the MLP's
bias into ``BiasGelu``. Standard ONNX has neither op, and TensorRT parses neither, so the fp32
``model.onnx`` every provider reads stays a plain graph; only the CPU-only int8 file uses them.
The LayerScale fold stays out of ``model.onnx`` too: TensorRT folds the Mul itself, and the fp16
copy made from ``model.onnx`` would hold weights times scales that can be ~1e-5 (DINOv2's init),
below fp16's normal range; int8 weights are scaled per output channel, so the fold costs them
nothing.
Measured on the demo student (2 cores, batch 32, ``benchmarks/bench_int8_demo.py``): see the
module ``model_export.quantize``.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from model_export.errors import ExportError

__all__ = [
    "DEFAULT_OPSET",
    "ENCODER_INPUT",
    "ENCODER_OUTPUT",
    "HEAD_INPUT",
    "HEAD_OUTPUTS",
    "MAX_EXPORT_BATCH",
    "ORT_FUSED_DOMAIN",
    "PATCH_OUTPUT",
    "EncoderForExport",
    "EncoderGraph",
    "HeadGraph",
    "MILHeadForExport",
    "check_onnx",
    "export_encoder",
    "export_mil_head",
    "strip_build_metadata",
]

DEFAULT_OPSET = 18
ENCODER_INPUT = "pixels"
ENCODER_OUTPUT = "embedding"
PATCH_OUTPUT = "patch_tokens"
HEAD_INPUT = "bag"
HEAD_OUTPUTS = ("probabilities", "attention")
MAX_EXPORT_BATCH = 4096  # upper bound of the symbolic batch dimension (TensorRT profiles narrow it)
_TRACE_BATCH = 2  # a batch of 1 would let the tracer specialise the batch axis to a constant
ORT_FUSED_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators (``ort_fused=True``)


@dataclass(frozen=True)
class EncoderGraph:
    """An exported encoder file and what it computes.

    Attributes:
        path: the ONNX file.
        img_px: input side in pixels (square).
        embed_dim: D, width of the embedding.
        n_patch_tokens: patch tokens per tile (0 when not exported).
        opset: ONNX opset of the default domain.
    """

    path: Path
    img_px: int
    embed_dim: int
    n_patch_tokens: int
    opset: int

    @property
    def output_names(self) -> tuple[str, ...]:
        return (ENCODER_OUTPUT, PATCH_OUTPUT) if self.n_patch_tokens else (ENCODER_OUTPUT,)


@dataclass(frozen=True)
class HeadGraph:
    """An exported slide head: bag [N, in_dim] -> probabilities [n_classes], attention [N]."""

    path: Path
    in_dim: int
    n_classes: int
    opset: int


class EncoderForExport(nn.Module):
    """A timm ViT seen as the package's encoder: (embedding, patch tokens) from normed tokens.

    The split follows ``training.models.student_tokens``: token 0 is CLS, then
    ``num_prefix_tokens - 1`` register tokens, then the patch grid in row-major order.
    """

    def __init__(self, model: nn.Module, *, with_patch_tokens: bool = True) -> None:
        super().__init__()
        self.model = model
        self.with_patch_tokens = with_patch_tokens
        self.n_prefix = int(getattr(model, "num_prefix_tokens", 1))

    def forward(self, pixels: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        tokens = self.model.forward_features(pixels)  # type: ignore[operator]
        if self.with_patch_tokens:
            return tokens[:, 0], tokens[:, self.n_prefix :]
        return tokens[:, 0]


class MILHeadForExport(nn.Module):
    """A ``GatedAttentionMIL`` (or any bag -> (probabilities, attention) module) as a graph."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, bag: Tensor) -> tuple[Tensor, Tensor]:
        probabilities, attention = self.head(bag)
        return probabilities, attention


def export_encoder(
    model: nn.Module,
    out_path: Path,
    *,
    img_px: int,
    with_patch_tokens: bool = True,
    opset: int = DEFAULT_OPSET,
    ort_fused: bool = False,
) -> EncoderGraph:
    """Export a timm ViT (eval mode, fp32) to ``out_path`` with a dynamic batch axis.

    Args:
        model: the encoder; ``forward_features`` must return final-normed tokens.
        out_path: the .onnx file written (weights inside the file, below 2 GB).
        img_px: tile side the model reads (224 for the XMAG student at 2.0 um/px).
        with_patch_tokens: also output the patch tokens (second output).
        opset: ONNX default-domain opset (17 or 18 for TensorRT/CUDA).
        ort_fused: write attention blocks and exact GELUs as ONNX Runtime's fused
            ``com.microsoft`` operators (CPU and CUDA providers only; see the module docstring),
            with each timm block's LayerScale folded into the Linear before it. Blocks of
            another shape stay plain; ``model`` itself is left unchanged.

    Raises:
        ExportError: the exporter failed or the graph does not pass ``onnx.checker``.
    """
    with _ort_fused_ops(model, enabled=ort_fused):
        return _export_encoder(model, out_path, img_px, with_patch_tokens, opset)


def _export_encoder(
    model: nn.Module, out_path: Path, img_px: int, with_patch_tokens: bool, opset: int
) -> EncoderGraph:
    wrapper = EncoderForExport(model.eval(), with_patch_tokens=with_patch_tokens).eval()
    example = torch.zeros(_TRACE_BATCH, 3, img_px, img_px)
    with torch.no_grad():
        out = wrapper(example)
    cls = out[0] if isinstance(out, tuple) else out
    n_patch = int(out[1].shape[1]) if isinstance(out, tuple) else 0
    names = [ENCODER_OUTPUT, PATCH_OUTPUT] if with_patch_tokens else [ENCODER_OUTPUT]
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    _run_exporter(
        wrapper,
        (example,),
        out_path,
        input_names=[ENCODER_INPUT],
        output_names=names,
        dynamic_shapes={"pixels": {0: batch}},
        opset=opset,
    )
    _name_dynamic_axes(out_path, {ENCODER_INPUT: 0, **dict.fromkeys(names, 0)}, "batch")
    strip_build_metadata(out_path)
    check_onnx(out_path)
    return EncoderGraph(out_path, img_px, int(cls.shape[-1]), n_patch, opset)


class _OrtAttention(nn.Module):
    """A timm ``Attention`` that exports as ``com.microsoft::Attention`` plus its output Linear.

    Outside an ONNX export it runs the original module, so tracing sees the same numbers.
    """

    weight: Tensor
    bias: Tensor

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn
        qkv, proj = attn.qkv, attn.proj
        assert isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)  # _fusable_attention
        self.proj = proj
        self.attrs: dict[str, int | float] = {
            "num_heads": int(attn.num_heads),  # type: ignore[arg-type]
            "scale": float(attn.scale),  # type: ignore[arg-type]
        }
        # ORT's layout: weights [hidden, 3 * hidden] (Q, K, V columns, heads contiguous in
        # each), as x @ W; a Linear stores W transposed.
        self.register_buffer("weight", qkv.weight.detach().t().contiguous(), persistent=False)
        bias = qkv.bias if qkv.bias is not None else torch.zeros(qkv.out_features)
        self.register_buffer("bias", bias.detach().clone(), persistent=False)

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        masked = bool(args) or kwargs.get("attn_mask") is not None or bool(kwargs.get("is_causal"))
        if masked or not torch.onnx.is_in_onnx_export():  # a mask: ORT's op has no such input
            out: Tensor = self.attn(x, *args, **kwargs)
            return out
        y = torch.onnx.ops.symbolic(
            f"{ORT_FUSED_DOMAIN}::Attention",
            (x, self.weight, self.bias),
            dict(self.attrs),
            dtype=x.dtype,
            shape=x.shape,
            version=1,
        )
        out = self.proj(y)
        return out


class _OrtGelu(nn.Module):
    """Exact GELU exported as ``com.microsoft::Gelu`` (opset 18 has no Gelu of its own)."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.onnx.is_in_onnx_export():
            return nn.functional.gelu(x)
        return torch.onnx.ops.symbolic(
            f"{ORT_FUSED_DOMAIN}::Gelu", (x,), {}, dtype=x.dtype, shape=x.shape, version=1
        )


class _FoldedLinear(nn.Module):
    """A Linear followed by a LayerScale ``g``, exported as one Linear with ``g`` in its weights.

    Outside an ONNX export it runs the original Linear (the LayerScale runs as ``_Unexported``).
    """

    weight: Tensor
    bias: Tensor

    def __init__(self, linear: nn.Linear, gamma: Tensor) -> None:
        super().__init__()
        self.linear = linear
        g = gamma.detach()
        bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
        self.register_buffer("weight", linear.weight.detach() * g[:, None], persistent=False)
        self.register_buffer("bias", bias.detach() * g, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.onnx.is_in_onnx_export():
            out: Tensor = self.linear(x)
            return out
        return nn.functional.linear(x, self.weight, self.bias)


class _Unexported(nn.Module):
    """Runs ``module`` outside an ONNX export and nothing inside one (its work is folded)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export():
            return x
        out: Tensor = self.module(x)
        return out


def _layer_scale_folds(block: nn.Module) -> list[tuple[str, str, str]]:
    """(branch, its last Linear, LayerScale) attribute names of each LayerScale of a timm ViT
    ``Block`` that directly scales the output of the branch's last Linear (attention ``proj``,
    MLP ``fc2``, each followed only by dropout)."""
    from timm.layers import LayerScale
    from timm.models.vision_transformer import Block

    if type(block) is not Block:  # other block types place their scales elsewhere
        return []
    folds = []
    for ls_name, branch_name, linear_name, drop_name in (
        ("ls1", "attn", "proj", "proj_drop"),
        ("ls2", "mlp", "fc2", "drop2"),
    ):
        ls, branch = getattr(block, ls_name, None), getattr(block, branch_name, None)
        linear, drop = getattr(branch, linear_name, None), getattr(branch, drop_name, None)
        if (
            isinstance(ls, LayerScale)
            and isinstance(linear, nn.Linear)
            and isinstance(drop, nn.Dropout | nn.Identity)
        ):
            folds.append((branch_name, linear_name, ls_name))
    return folds


def _fusable_attention(module: nn.Module) -> bool:
    """A timm-style self-attention ORT's Attention op computes exactly: one QKV Linear whose
    output is 3 x its input, no q/k norms, no norm or gate before the projection."""
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
        return False
    heads, scale = getattr(module, "num_heads", None), getattr(module, "scale", None)
    if not isinstance(heads, int) or not isinstance(scale, float):
        return False
    if qkv.out_features != 3 * qkv.in_features or qkv.in_features % heads:
        return False
    plain = all(
        isinstance(getattr(module, name, nn.Identity()), nn.Identity)
        for name in ("q_norm", "k_norm", "norm")
    )
    return plain and getattr(module, "gate", None) is None


@contextlib.contextmanager
def _ort_fused_ops(model: nn.Module, *, enabled: bool) -> Iterator[None]:
    """Swap fusable attention blocks and exact GELUs for their ORT-op exporters and fold
    LayerScales into the Linear before them, for the export only; then put everything back."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []

    def swap(parent: nn.Module, name: str, replacement: nn.Module) -> None:
        swapped.append((parent, name, getattr(parent, name)))
        setattr(parent, name, replacement)

    if enabled:
        folds = [(b, *names) for b in model.modules() for names in _layer_scale_folds(b)]
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if _fusable_attention(child):
                    swap(parent, name, _OrtAttention(child))
                elif isinstance(child, nn.GELU) and child.approximate == "none":
                    swap(parent, name, _OrtGelu())
        for block, branch_name, linear_name, ls_name in folds:
            branch = getattr(block, branch_name)  # an _OrtAttention keeps the block's proj
            ls = getattr(block, ls_name)
            swap(branch, linear_name, _FoldedLinear(getattr(branch, linear_name), ls.gamma))
            swap(block, ls_name, _Unexported(ls))
    try:
        yield
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


def export_mil_head(
    head: nn.Module, out_path: Path, *, in_dim: int, opset: int = DEFAULT_OPSET
) -> HeadGraph:
    """Export a slide head ``bag [N, in_dim] -> (probabilities [C], attention [N])``.

    Raises:
        ExportError: the exporter failed, the head's outputs have other shapes, or the graph
            does not pass ``onnx.checker``.
    """
    wrapper = MILHeadForExport(head.eval()).eval()
    example = torch.randn(7, in_dim)
    with torch.no_grad():
        probabilities, attention = wrapper(example)
    if probabilities.ndim != 1 or tuple(attention.shape) != (7,):
        raise ExportError(
            f"head for {out_path.name} returned probabilities {tuple(probabilities.shape)} and "
            f"attention {tuple(attention.shape)} for a bag of 7; expected [C] and [7].",
            reason="head_shape",
        )
    n_tiles = torch.export.Dim("n_tiles", min=1, max=1_000_000)
    _run_exporter(
        wrapper,
        (example,),
        out_path,
        input_names=[HEAD_INPUT],
        output_names=list(HEAD_OUTPUTS),
        dynamic_shapes={"bag": {0: n_tiles}},
        opset=opset,
    )
    _name_dynamic_axes(out_path, {HEAD_INPUT: 0, HEAD_OUTPUTS[1]: 0}, "n_tiles")
    strip_build_metadata(out_path)
    check_onnx(out_path)
    return HeadGraph(out_path, in_dim, int(probabilities.shape[0]), opset)


def check_onnx(path: Path) -> None:
    """``onnx.checker`` with full shape inference on a written file.

    Raises:
        ExportError: the file is not a valid ONNX model.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(
            f"{path} fails the ONNX checker ({_first_line(exc)}); the export is broken: report "
            "the model and the torch version.",
            reason="onnx_checker",
            path=path,
        ) from exc


def _run_exporter(
    module: nn.Module,
    args: tuple[Tensor, ...],
    out_path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: dict[str, dict[int, object]],
    opset: int,
) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter prints progress lines to stdout; keep them out of the CLI's own output.
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            # torch.export warns about deprecated internals it uses itself; nothing for a user.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                external_data=False,
                optimize=True,
                verbose=False,
            )
            if program is None:  # pragma: no cover - dynamo=True always returns a program
                raise ExportError("the ONNX exporter returned nothing.", reason="exporter")
            program.save(str(out_path), external_data=False)
    except ExportError:
        raise
    except Exception as exc:  # the exporter raises many types; all mean "this module failed"
        raise ExportError(
            f"exporting {type(module).__name__} to {out_path} failed ({type(exc).__name__}: "
            f"{_first_line(exc)}); the model uses an operation torch.export cannot trace.",
            reason="exporter",
            path=out_path,
        ) from exc


def _name_dynamic_axes(path: Path, axes: dict[str, int], name: str) -> None:
    """Give dynamic axes a stable symbolic name (the exporter's are generated: s0, s77...)."""
    model = onnx.load(str(path))
    changed = False
    for value in [*model.graph.input, *model.graph.output]:
        if value.name in axes:
            dim = value.type.tensor_type.shape.dim[axes[value.name]]
            if not dim.HasField("dim_value") and dim.dim_param != name:
                dim.dim_param = name
                changed = True
    if changed:  # the exporter usually names them after the torch.export Dim already
        onnx.save(model, str(path))


def strip_build_metadata(path: Path) -> bool:
    """Remove what the exporter records about the build machine from an ONNX file, in place.

    torch.export writes, on every node, the Python stack trace that created it (absolute paths
    of the build's source files and virtual environment), the FX node text and module scopes;
    on the graph, the ExportedProgram signature with generated symbol names. None of it is read
    by ONNX Runtime or TensorRT, and it makes the bytes (and the card's sha256) depend on the
    folder and machine the export ran on. Node, graph, function and value-info
    ``metadata_props`` and ``doc_string`` are cleared, in subgraphs too.

    Returns:
        True when the file was rewritten.
    """
    model = onnx.load(str(path))
    changed = _strip_model(model)
    if changed:
        onnx.save(model, str(path))
    return changed


def _strip_model(model: onnx.ModelProto) -> bool:
    changed = _clear(model)
    changed |= _strip_graph(model.graph)
    for fn in model.functions:
        changed |= _clear(fn)
        for node in fn.node:
            changed |= _strip_node(node)
    return changed


def _strip_graph(graph: onnx.GraphProto) -> bool:
    changed = _clear(graph)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        changed |= _clear(value)
    for node in graph.node:
        changed |= _strip_node(node)
    return changed


def _strip_node(node: onnx.NodeProto) -> bool:
    changed = _clear(node)
    for attr in node.attribute:
        if attr.HasField("g"):
            changed |= _strip_graph(attr.g)
        for sub in attr.graphs:
            changed |= _strip_graph(sub)
    return changed


def _clear(proto: object) -> bool:
    changed = False
    props = getattr(proto, "metadata_props", None)
    if props is not None and len(props):
        del props[:]
        changed = True
    if getattr(proto, "doc_string", ""):
        proto.doc_string = ""  # type: ignore[attr-defined]
        changed = True
    return changed


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
