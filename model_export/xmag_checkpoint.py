"""Import the official XMAG student checkpoint (DINOv2 reference layout) into a timm ViT-B/14.

The XMAG release is a torch file whose ``state_dict`` holds a DINOv2 ViT-B/14 with every key
prefixed ``model.``, in the DINOv2 reference layout::

    cls_token [1, 1, 768]   pos_embed [1, 1 + 37*37, 768] (518-px grid)   mask_token [1, 768]
    patch_embed.proj.{weight [768, 3, 14, 14], bias [768]}
    blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}   N < 12
    norm.{weight, bias}

``checkpoint_filter_fn`` maps it onto timm's ``vit_base_patch14_dinov2`` built for 224-px input:
the keys are the same names once the prefix is gone, ``mask_token`` is dropped (only DINOv2's
masked-image training uses it), and the 37x37 position grid is resized to 16x16 exactly as
DINOv2's ``interpolate_pos_encoding`` does at every forward of a 224-px image (bicubic with the
historical ``+0.1`` scale offset, no antialiasing, class token kept apart). Baking that once into
the model gives the same network the authors ran at 224 px, and the ONNX graph has no resize.
timm's own ``resample_abs_pos_embed`` antialiases by default and targets the size, not the
offset scale, so it is *not* used here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from model_export.errors import CheckpointError

__all__ = [
    "DINOV2_INTERPOLATE_OFFSET",
    "XMAG_ARCH",
    "XMAG_EMBED_DIM",
    "XMAG_IMG_PX",
    "XMAG_KEY_PREFIX",
    "XMAG_SOURCE_IMG_PX",
    "XmagCheckpointInfo",
    "build_xmag_student",
    "checkpoint_filter_fn",
    "dinov2_interpolate_pos_embed",
    "expected_xmag_shapes",
    "read_xmag_state_dict",
]

XMAG_ARCH = "vit_base_patch14_dinov2"
XMAG_KEY_PREFIX = "model."
XMAG_EMBED_DIM = 768
XMAG_DEPTH = 12
XMAG_MLP_DIM = 3072
XMAG_PATCH_PX = 14
XMAG_SOURCE_IMG_PX = 518  # DINOv2 pretraining resolution: a 37x37 patch grid
XMAG_IMG_PX = 224  # the student's input at 2.0 um/px: a 16x16 patch grid
# DINOv2 adds this to the target grid before dividing by the source grid to get the scale factor
# (a floating-point workaround inherited from DINO); it shifts every sample a little, so matching
# it matters for bit-faithful position embeddings.
DINOV2_INTERPOLATE_OFFSET = 0.1
_IGNORED_KEYS = frozenset({"mask_token"})
_MAX_KEYS_IN_MESSAGE = 6


@dataclass(frozen=True)
class XmagCheckpointInfo:
    """What the import found in the file, for the package card and the export log.

    Attributes:
        path: the checkpoint file.
        n_tensors: tensors under the ``model.`` prefix.
        ignored_keys: keys present but unused (``mask_token``; entries outside ``model.``).
        source_grid: side of the stored position grid (37 for 518 px).
        target_grid: side of the grid baked into the model (16 for 224 px).
    """

    path: Path
    n_tensors: int
    ignored_keys: tuple[str, ...]
    source_grid: int
    target_grid: int


def expected_xmag_shapes(
    *,
    depth: int = XMAG_DEPTH,
    embed_dim: int = XMAG_EMBED_DIM,
    mlp_dim: int = XMAG_MLP_DIM,
    source_img_px: int = XMAG_SOURCE_IMG_PX,
    patch_px: int = XMAG_PATCH_PX,
) -> dict[str, tuple[int, ...]]:
    """Every tensor of the DINOv2 reference ViT (without prefix) and its shape.

    Defaults describe the XMAG student (ViT-B/14, 518-px position grid); ``mask_token`` is
    included because the release carries it, though nothing uses it.
    """
    grid = source_img_px // patch_px
    d = embed_dim
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + grid * grid, d),
        "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, patch_px, patch_px),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (d,),
                b + "norm1.bias": (d,),
                b + "attn.qkv.weight": (3 * d, d),
                b + "attn.qkv.bias": (3 * d,),
                b + "attn.proj.weight": (d, d),
                b + "attn.proj.bias": (d,),
                b + "ls1.gamma": (d,),
                b + "norm2.weight": (d,),
                b + "norm2.bias": (d,),
                b + "mlp.fc1.weight": (mlp_dim, d),
                b + "mlp.fc1.bias": (mlp_dim,),
                b + "mlp.fc2.weight": (d, mlp_dim),
                b + "mlp.fc2.bias": (d,),
                b + "ls2.gamma": (d,),
            }
        )
    return shapes


def read_xmag_state_dict(path: Path | str) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Read the release file and return its ``model.`` tensors without the prefix.

    Args:
        path: the torch file (``torch.save`` of a dict with a ``state_dict`` entry).

    Returns:
        (tensors by DINOv2 key, keys outside the ``model.`` prefix that were left out).

    Raises:
        CheckpointError: the file is missing, not a torch file (corrupt or truncated), has no
            ``state_dict`` mapping, or no key under ``model.``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"XMAG checkpoint {path} does not exist; give the path of the downloaded release file.",
            reason="not_found",
            path=path,
        )
    try:
        # weights_only: a release file is data; never run pickled code from it.
        raw: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # every decode failure of a user file is the same input error
        raise CheckpointError(
            f"XMAG checkpoint {path} could not be read as a torch file ({type(exc).__name__}: "
            f"{_first_line(exc)}); it is corrupt or truncated: download it again and compare "
            "its checksum with the published one.",
            reason="corrupt",
            path=path,
        ) from exc
    state = raw.get("state_dict") if isinstance(raw, Mapping) else None
    if not isinstance(state, Mapping):
        found = sorted(map(str, raw))[:_MAX_KEYS_IN_MESSAGE] if isinstance(raw, Mapping) else []
        raise CheckpointError(
            f"XMAG checkpoint {path} has no 'state_dict' mapping (top-level keys: "
            f"{found or type(raw).__name__}); this is not the XMAG release layout.",
            reason="layout",
            path=path,
        )
    tensors: dict[str, Tensor] = {}
    outside: list[str] = []
    for key, value in state.items():
        key = str(key)
        if key.startswith(XMAG_KEY_PREFIX) and isinstance(value, Tensor):
            tensors[key[len(XMAG_KEY_PREFIX) :]] = value
        else:
            outside.append(key)
    if not tensors:
        raise CheckpointError(
            f"XMAG checkpoint {path} has no tensor under the '{XMAG_KEY_PREFIX}' prefix "
            f"(first keys: {_short(sorted(outside))}); this is not the XMAG release layout.",
            reason="layout",
            path=path,
        )
    return tensors, tuple(sorted(outside))


def validate_xmag_state_dict(state_dict: Mapping[str, Tensor], *, source: Path) -> None:
    """Check keys and shapes against the ViT-B/14 DINOv2 layout.

    Raises:
        CheckpointError: with ``reason`` ``missing_keys``, ``unexpected_keys`` or
            ``shape_mismatch``, naming the first offending keys.
    """
    expected = expected_xmag_shapes()
    required = set(expected) - _IGNORED_KEYS
    missing = sorted(required - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        raise CheckpointError(
            f"XMAG checkpoint {source} lacks {len(missing)} tensor(s) of the ViT-B/14 DINOv2 "
            f"layout: {_short(missing)}; the file is incomplete or another architecture.",
            reason="missing_keys",
            path=source,
            missing=missing[:_MAX_KEYS_IN_MESSAGE],
        )
    if unexpected:
        raise CheckpointError(
            f"XMAG checkpoint {source} has {len(unexpected)} tensor(s) a ViT-B/14 DINOv2 does not: "
            f"{_short(unexpected)}; it is another architecture (registers? more blocks?).",
            reason="unexpected_keys",
            path=source,
            unexpected=unexpected[:_MAX_KEYS_IN_MESSAGE],
        )
    bad = [
        f"model.{k} {tuple(state_dict[k].shape)} (expected {expected[k]})"
        for k in sorted(expected)
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    if bad:
        raise CheckpointError(
            f"XMAG checkpoint {source} has tensors of the wrong shape: {_short(bad)}; it is not a "
            "ViT-B/14 (768-d, 12 blocks, patch 14) trained at 518 px.",
            reason="shape_mismatch",
            path=source,
        )
    non_float = sorted(k for k, v in state_dict.items() if not torch.is_floating_point(v))
    if non_float:
        raise CheckpointError(
            f"XMAG checkpoint {source} has non-float tensors: {_short(non_float)}.",
            reason="dtype",
            path=source,
        )


def dinov2_interpolate_pos_embed(
    pos_embed: Tensor,
    target_grid: int,
    *,
    offset: float = DINOV2_INTERPOLATE_OFFSET,
    antialias: bool = False,
) -> Tensor:
    """Resize a (1, 1 + M*M, D) position embedding to (1, 1 + G*G, D) as DINOv2 does.

    The class-token embedding is kept apart; the M x M patch grid is bicubically resampled with
    a scale factor of ``(G + offset) / M`` (DINOv2's ``interpolate_offset``), without
    antialiasing, in float32, then cast back to the input dtype.

    Args:
        pos_embed: (1, 1 + M*M, D) with the class token first.
        target_grid: G, the patch grid side for the new input (224 px / 14 = 16).
        offset: DINOv2's ``interpolate_offset`` (0.1 for the released models; 0 means "by size").
        antialias: DINOv2's ``interpolate_antialias`` (False for the released models).
    """
    n_patch = pos_embed.shape[1] - 1
    m = math.isqrt(n_patch)
    if m * m != n_patch:
        raise CheckpointError(
            f"pos_embed has {n_patch} patch positions, not a square grid.", reason="shape_mismatch"
        )
    if m == target_grid:
        return pos_embed.clone()
    dim = pos_embed.shape[-1]
    pe = pos_embed.float()
    cls_pe, patch_pe = pe[:, :1], pe[:, 1:]
    grid = patch_pe.reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        scale = float(target_grid + offset) / m
        grid = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(
            grid, size=(target_grid, target_grid), mode="bicubic", antialias=antialias
        )
    if tuple(grid.shape[-2:]) != (target_grid, target_grid):  # the offset must not change the size
        raise CheckpointError(
            f"interpolating the {m}x{m} position grid gave {tuple(grid.shape[-2:])}, not "
            f"{target_grid}x{target_grid}.",
            reason="shape_mismatch",
        )
    patch_pe = grid.permute(0, 2, 3, 1).reshape(1, target_grid * target_grid, dim)
    return torch.cat([cls_pe, patch_pe], dim=1).to(pos_embed.dtype)


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map a DINOv2-layout state dict (prefix already removed or not) onto a timm DINOv2 ViT.

    Drops ``mask_token`` and resizes ``pos_embed`` to the model's patch grid the DINOv2 way; the
    other keys carry the same names in both layouts. timm's convention for outside checkpoints.
    """
    sd = {
        (k[len(XMAG_KEY_PREFIX) :] if k.startswith(XMAG_KEY_PREFIX) else k): v
        for k, v in state_dict.items()
    }
    out = {k: v for k, v in sd.items() if k not in _IGNORED_KEYS}
    grid: tuple[int, int] = tuple(model.patch_embed.grid_size)  # type: ignore[union-attr,arg-type]
    if grid[0] != grid[1]:
        raise CheckpointError(f"the model's patch grid {tuple(grid)} is not square.")
    if "pos_embed" in out:
        out["pos_embed"] = dinov2_interpolate_pos_embed(out["pos_embed"], int(grid[0]))
    return out


def build_xmag_student(
    path: Path | str, *, img_size: int = XMAG_IMG_PX
) -> tuple[nn.Module, XmagCheckpointInfo]:
    """The XMAG student as a timm ViT-B/14 for ``img_size``-px input, in eval mode.

    ``model(x)`` returns the final-normed CLS token (DINOv2's ``x_norm_clstoken``), 768-d, for
    ImageNet-normalised RGB input.

    Raises:
        CheckpointError: see ``read_xmag_state_dict`` and ``validate_xmag_state_dict``.
    """
    path = Path(path)
    if img_size % XMAG_PATCH_PX:
        raise CheckpointError(
            f"img_size {img_size} is not a multiple of the patch size {XMAG_PATCH_PX}.",
            reason="img_size",
        )
    tensors, outside = read_xmag_state_dict(path)
    validate_xmag_state_dict(tensors, source=path)
    model = timm.create_model(XMAG_ARCH, pretrained=False, num_classes=0, img_size=img_size)
    mapped = checkpoint_filter_fn(tensors, model)
    result = model.load_state_dict(mapped, strict=False)
    # The layout check above makes this unreachable unless timm renames its parameters.
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"XMAG checkpoint {path} does not fit timm's {XMAG_ARCH} (missing "
            f"{_short(list(result.missing_keys))}; unexpected "
            f"{_short(list(result.unexpected_keys))}).",
            reason="layout",
            path=path,
        )
    n_source = tensors["pos_embed"].shape[1] - 1
    info = XmagCheckpointInfo(
        path=path,
        n_tensors=len(tensors),
        ignored_keys=tuple(sorted(set(tensors) & _IGNORED_KEYS)) + outside,
        source_grid=math.isqrt(n_source),
        target_grid=img_size // XMAG_PATCH_PX,
    )
    return model.eval(), info


def _short(keys: list[str]) -> str:
    more = len(keys) - _MAX_KEYS_IN_MESSAGE
    return ", ".join(keys[:_MAX_KEYS_IN_MESSAGE]) + (f" (+{more} more)" if more > 0 else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
