"""The networks of cross-magnification distillation: the 5x student, its heads, the MIL slide head.

Contract shared with ``model_export/`` (see BRIEF.md): ``build_student``, ``student_tokens``,
``ProjectionHead``, ``GatedAttentionMIL`` and the checkpoint layout ``CHECKPOINT_FORMAT``. Weights
only ever come from local files; nothing here downloads (``pretrained=False`` always).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from xmag.errors import ModelPackageError

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEFAULT_STUDENT_ARCH",
    "GatedAttentionMIL",
    "ProjectionHead",
    "build_student",
    "load_checkpoint",
    "load_weights_into",
    "mil_from_checkpoint",
    "read_state_dict",
    "student_from_checkpoint",
    "student_tokens",
]

CHECKPOINT_FORMAT = "xmag-train-checkpoint/1"
DEFAULT_STUDENT_ARCH = "vit_small_patch14_dinov2"
# Prefixes that wrappers (DDP, Lightning, DINOv2 training code, the XMAG release) put before the
# backbone's own keys; stripped when every key carries one.
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "student.", "teacher.")
# Keys some layouts carry that a timm ViT does not use at inference.
_IGNORED_KEYS = frozenset({"mask_token"})
_MAX_KEYS_IN_MESSAGE = 8


def build_student(
    arch: str = DEFAULT_STUDENT_ARCH,
    *,
    img_size: int = 224,
    weights: Path | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm ViT without classifier (``num_classes=0``) for 5x tiles of ``img_size`` px.

    Args:
        arch: timm model name; the XMAG student is ``vit_base_patch14_dinov2`` (ViT-B/14, 768-d).
        img_size: input side in pixels (224 at 2.0 um/px gives 16x16 patch tokens with patch 14).
        weights: a local state-dict file (DINOv2 reference layout, timm layout, or an xmag training
            checkpoint, whose EMA student is used); None keeps the random init.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``embed_dim=192, depth=4`` for the
            demo's tiny student).

    Raises:
        ModelPackageError: the weights file is missing, unreadable or does not fit ``arch``.
    """
    model = timm.create_model(
        arch, pretrained=False, num_classes=0, img_size=img_size, **timm_kwargs
    )
    if weights is not None:
        load_weights_into(model, read_state_dict(weights), source=Path(weights))
    return model


def student_tokens(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Final-normed CLS and patch tokens of a timm ViT.

    Args:
        model: a timm ``VisionTransformer`` (CLS token first, then register tokens, then patches).
        x: (B, 3, H, W) normalised images.

    Returns:
        (cls [B, D], patch tokens [B, H/p * W/p, D]) with patch tokens in row-major order of the
        patch grid (row 0 left to right, then row 1...).
    """
    tokens = model.forward_features(x)  # (B, prefix + N, D), after the final norm
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    return tokens[:, 0], tokens[:, n_prefix:]


class ProjectionHead(nn.Module):
    """Linear(d_in, d_hid) -> BatchNorm1d -> GELU -> Linear(d_hid, d_out) (XMAG: 768->1536->1536).

    Accepts (B, d_in) or (B, T, d_in); tokens are flattened into the batch for the norm.
    """

    def __init__(self, d_in: int, d_hid: int, d_out: int) -> None:
        super().__init__()
        self.d_in, self.d_hid, self.d_out = d_in, d_hid, d_out
        self.fc1 = nn.Linear(d_in, d_hid)
        self.norm = nn.BatchNorm1d(d_hid)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_hid, d_out)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        h = self.fc1(x.reshape(-1, x.shape[-1]))
        h = self.fc2(self.act(self.norm(h)))
        return h.reshape(*lead, self.d_out)


class GatedAttentionMIL(nn.Module):
    """Gated attention pooling (Ilse et al. 2018) over a bag of tile embeddings, then a classifier.

    ``forward(bag [N, D]) -> (probabilities [C], attention [N])``: softmax class probabilities and
    attention weights that sum to 1 over the bag. ``forward_logits`` gives the logits for training.
    """

    def __init__(self, in_dim: int, hidden: int = 128, n_classes: int = 2, dropout: float = 0.0):
        super().__init__()
        self.in_dim, self.hidden, self.n_classes = in_dim, hidden, n_classes
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(hidden, hidden)  # tanh branch: what a tile shows
        self.attn_u = nn.Linear(hidden, hidden)  # sigmoid gate: how much to trust it
        self.attn_w = nn.Linear(hidden, 1)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward_logits(self, bag: Tensor) -> tuple[Tensor, Tensor]:
        """(logits [C], attention [N]) for one bag (N tiles, D features)."""
        h = self.embed(bag)
        scores = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h)))
        attention = torch.softmax(scores.squeeze(-1), dim=0)
        pooled = attention @ h
        return self.classifier(pooled), attention

    def forward(self, bag: Tensor) -> tuple[Tensor, Tensor]:
        logits, attention = self.forward_logits(bag)
        return torch.softmax(logits, dim=-1), attention


# -- weights files -------------------------------------------------------------------------------
def read_state_dict(path: Path | str) -> dict[str, Tensor]:
    """Tensors from a local weights file (.pt/.pth/.bin torch pickle or .safetensors).

    Unwraps common containers: an xmag training checkpoint (its ``student_ema``), or a dict under
    ``state_dict``/``model``/``teacher``; strips a wrapper prefix shared by every key.

    Raises:
        ModelPackageError: the file does not exist or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelPackageError(
            f"weights file {path} does not exist; give the path of a local state-dict file "
            "(nothing is downloaded).",
            path=path,
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any decode failure of a user file is the same input error
        raise ModelPackageError(
            f"weights file {path} could not be read as a torch or safetensors state dict "
            f"({type(exc).__name__}: {exc}); check that it is a complete weights file.",
            path=path,
        ) from exc
    return _unwrap_state_dict(raw, path)


def _unwrap_state_dict(raw: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(raw, Mapping) and raw.get("format") == CHECKPOINT_FORMAT:
        raw = raw["student_ema"]
    for key in ("state_dict", "model", "teacher"):
        if isinstance(raw, Mapping) and isinstance(raw.get(key), Mapping):
            raw = raw[key]
            break
    if not isinstance(raw, Mapping) or not raw:
        raise ModelPackageError(f"weights file {path} holds no state dict.", path=path)
    sd = {str(k): v for k, v in raw.items() if isinstance(v, Tensor)}
    for prefix in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _short(keys: list[str]) -> str:
    more = len(keys) - _MAX_KEYS_IN_MESSAGE
    return ", ".join(keys[:_MAX_KEYS_IN_MESSAGE]) + (f" (+{more} more)" if more > 0 else "")


def load_weights_into(model: nn.Module, state_dict: Mapping[str, Tensor], *, source: Path) -> None:
    """Load ``state_dict`` into ``model`` strictly, resizing a ViT's position embedding if needed.

    Raises:
        ModelPackageError: keys are missing or unexpected, or shapes differ (other than the
            position embedding's grid, which is resampled as DINOv2 and timm do).
    """
    sd = {k: v for k, v in state_dict.items() if k not in _IGNORED_KEYS}
    own = model.state_dict()
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        sd["pos_embed"] = _resize_pos_embed(model, sd["pos_embed"])
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_shapes = sorted(
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(sd) & set(own)
        if sd[k].shape != own[k].shape
    )
    if missing or unexpected or bad_shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        if bad_shapes:
            parts.append(f"shape mismatches (file vs model): {_short(bad_shapes)}")
        raise ModelPackageError(
            f"weights file {source} does not fit the {type(model).__name__} built here ("
            + "; ".join(parts)
            + "); check the architecture name and its settings match the weights.",
            path=source,
            missing=len(missing),
            unexpected=len(unexpected),
            shape_mismatches=len(bad_shapes),
        )
    model.load_state_dict(sd, strict=True)


def _resize_pos_embed(model: nn.Module, pos_embed: Tensor) -> Tensor:
    """Resample a stored absolute position embedding to ``model``'s patch grid (bicubic)."""
    grid = tuple(model.patch_embed.grid_size)  # type: ignore[union-attr]
    n_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    return resample_abs_pos_embed(pos_embed, new_size=list(grid), num_prefix_tokens=n_prefix)


# -- checkpoints -----------------------------------------------------------------------------------
def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read an xmag training checkpoint (see ``CHECKPOINT_FORMAT``) on the CPU.

    Raises:
        ModelPackageError: the file is missing, unreadable, or not an xmag training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelPackageError(f"checkpoint {path} does not exist.", path=path)
    try:
        # Checkpoints hold optimizer/RNG state (numpy arrays, python objects) as well as tensors.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file is an input error
        raise ModelPackageError(
            f"checkpoint {path} could not be read ({type(exc).__name__}: {exc}); it may be "
            "truncated: use the last complete checkpoint.",
            path=path,
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ModelPackageError(
            f"{path} is not an xmag training checkpoint (format {found!r}, expected "
            f"{CHECKPOINT_FORMAT!r}).",
            path=path,
        )
    return ckpt


def student_from_checkpoint(ckpt: Mapping[str, Any], *, ema: bool = True) -> nn.Module:
    """Rebuild the student of a checkpoint (EMA weights by default) in eval mode."""
    model = build_student(
        ckpt["arch"], img_size=int(ckpt["img_size"]), **dict(ckpt.get("timm_kwargs") or {})
    )
    key = "student_ema" if ema else "student"
    load_weights_into(model, ckpt[key], source=Path(f"<checkpoint:{key}>"))
    return model.eval()


def mil_from_checkpoint(ckpt: Mapping[str, Any], name: str) -> tuple[GatedAttentionMIL, list[str]]:
    """Rebuild the slide head ``name`` of a checkpoint; returns (head in eval mode, labels)."""
    entry = ckpt["heads"][name]
    if entry.get("kind") != "gated_attention_mil":
        raise ModelPackageError(f"head {name!r} is of kind {entry.get('kind')!r}, not MIL.")
    labels = list(entry["labels"])
    head = GatedAttentionMIL(int(entry["in_dim"]), int(entry["hidden"]), len(labels))
    head.load_state_dict(entry["state_dict"])
    return head.eval(), labels
