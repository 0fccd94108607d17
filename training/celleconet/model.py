"""The context model: a small transformer reads each region's cells as a sentence of words.

Per cell (a token): word embedding + type embedding (a ``[MASK]`` row for each, used by
masked-word pretraining) + Fourier features of its position in um + its *phrase* (the mean of its
neighbours' token embeddings through a linear map). Attention between cells of a region is biased
by distance: head h adds ``-softplus(slope_h) * distance_um / distance_scale_um`` to its logits,
with slopes initialised from local (about 20 um) to almost global, so heads can read
neighbourhoods or the whole region (an ALiBi-style bias, in micrometres instead of token
offsets). Context-dependent meaning: a word's output vector depends on what surrounds it, and
masked-word prediction (hide a cell, predict its word from context) is where that is learnt
without labels.

Pooling: gated attention over a region's cells gives the region embedding (and cell attention);
gated attention over regions gives the slide embedding (and region attention); two linear heads
give the log-risk (Cox) and the logit of recurrence within the horizon (5 years).

Export: ``forward`` has fixed-rank inputs (B, R, M[, K]) with boolean masks and no data-dependent
Python control flow; padded cells and regions are masked with a large negative logit, never
removed. ``RegionEncoder`` + cell pooling and the region pooling + heads are separate modules so a
server can encode regions in batches of any number and pool a slide's regions afterwards.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import ContextModelConfig

__all__ = [
    "CellEcoNet",
    "FourierPositions",
    "MaskedGatedPool",
    "NeighbourhoodAttention",
    "RegionEncoder",
    "SlideHead",
]

_NEG = -1e4  # masked logit: finite, so a fully padded row gives zeros, not NaN


class FourierPositions(nn.Module):
    """Random-direction Fourier features of (x, y) in um, wavelengths log-spaced, then linear."""

    def __init__(self, cfg: ContextModelConfig, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        angle = torch.rand(cfg.n_frequencies, generator=g) * 2 * math.pi
        wavelength = torch.logspace(
            math.log10(cfg.min_wavelength_um), math.log10(cfg.max_wavelength_um), cfg.n_frequencies
        )
        omega = 2 * math.pi / wavelength
        self.freqs: Tensor
        self.register_buffer("freqs", torch.stack([angle.cos(), angle.sin()]) * omega)  # (2, F)
        self.proj = nn.Linear(2 * cfg.n_frequencies, cfg.dim)

    def forward(self, xy_um: Tensor) -> Tensor:
        p = xy_um @ self.freqs
        return self.proj(torch.cat([p.sin(), p.cos()], dim=-1))


class NeighbourhoodAttention(nn.Module):
    """Multi-head self-attention over a region's cells with a learnt distance bias per head.

    No dropout on the attention weights: on CPU it cost as much as the rest of the layer."""

    def __init__(self, cfg: ContextModelConfig):
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"dim {cfg.dim} is not a multiple of heads {cfg.heads}")
        self.heads, self.head_dim = cfg.heads, cfg.dim // cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)
        # softplus(slope) from 1 (bias -1 per distance_scale_um: local) to 0.02 (nearly global)
        target = torch.logspace(0, math.log10(0.02), cfg.heads)
        self.slope = nn.Parameter(torch.log(torch.expm1(target)))

    def forward(self, x: Tensor, dist: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, M, D), dist (N, M, M) in distance_scale_um units, key_mask (N, M) bool.

        Returns (output (N, M, D), attention (N, H, M, M))."""
        n, m, d = x.shape
        qkv = self.qkv(x).reshape(n, m, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        logits = logits - nn.functional.softplus(self.slope)[None, :, None, None] * dist[:, None]
        logits = logits.masked_fill(~key_mask[:, None, None, :], _NEG)
        attn = torch.softmax(logits, dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(n, m, d)
        return self.out(y), attn


class _Block(nn.Module):
    def __init__(self, cfg: ContextModelConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = NeighbourhoodAttention(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, 2 * cfg.dim),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(2 * cfg.dim, cfg.dim),
        )

    def forward(self, x: Tensor, dist: Tensor, key_mask: Tensor) -> Tensor:
        y, _ = self.attn(self.ln1(x), dist, key_mask)
        x = x + y
        return x + self.mlp(self.ln2(x))


class RegionEncoder(nn.Module):
    """Cells of N regions (N, M) -> contextual cell vectors (N, M, D)."""

    def __init__(self, n_words: int, cfg: ContextModelConfig, seed: int = 0):
        super().__init__()
        self.n_words, self.cfg = n_words, cfg
        self.word_emb = nn.Embedding(n_words + 1, cfg.dim)  # row n_words = [MASK]
        self.type_emb = nn.Embedding(cfg.n_types + 1, cfg.dim)  # row n_types = [MASK]
        self.pos = FourierPositions(cfg, seed)
        self.phrase = nn.Linear(cfg.dim, cfg.dim)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(
        self,
        words: Tensor,
        types: Tensor,
        xy_um: Tensor,
        nbr_index: Tensor,
        nbr_mask: Tensor,
        cell_mask: Tensor,
        hide: Tensor,
    ) -> Tensor:
        """words, types (N, M) int64; xy_um (N, M, 2); nbr_index (N, M, K) int64 slots;
        nbr_mask (N, M, K), cell_mask (N, M), hide (N, M) bool (cells shown as [MASK])."""
        w = torch.where(hide, torch.full_like(words, self.n_words), words)
        t = torch.where(hide, torch.full_like(types, self.cfg.n_types), types)
        tok = self.word_emb(w) + self.type_emb(t)
        n, m, k = nbr_index.shape
        d = tok.shape[-1]
        # phrases are gathered from the (possibly masked) tokens, so a hidden cell cannot leak
        # its word back to itself through a neighbour's phrase
        gathered = torch.gather(tok, 1, nbr_index.reshape(n, m * k, 1).expand(n, m * k, d))
        wts = nbr_mask.to(tok.dtype).unsqueeze(-1)
        phrase = (gathered.reshape(n, m, k, d) * wts).sum(2) / wts.sum(2).clamp(min=1.0)
        x = tok + self.phrase(phrase) + self.pos(xy_um)
        diff = xy_um.unsqueeze(2) - xy_um.unsqueeze(1)
        dist = torch.sqrt((diff * diff).sum(-1) + 1e-6) / self.cfg.distance_scale_um
        for blk in self.blocks:
            x = blk(x, dist, cell_mask)
        return self.norm(x)


class MaskedGatedPool(nn.Module):
    """Gated attention pooling (Ilse et al. 2018) over axis 1 with a padding mask."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.v, self.u, self.w = (
            nn.Linear(dim, hidden),
            nn.Linear(dim, hidden),
            nn.Linear(hidden, 1),
        )

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """h (N, L, D), mask (N, L) -> (pooled (N, D), attention (N, L), zero where masked)."""
        s = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1)
        a = torch.softmax(s.masked_fill(~mask, _NEG), dim=-1) * mask.to(h.dtype)
        return (a.unsqueeze(-1) * h).sum(1), a


class SlideHead(nn.Module):
    """Region embeddings (B, R, D) -> log-risk (B,), horizon logit (B,), region attention (B, R)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.pool = MaskedGatedPool(dim, dim)
        self.risk = nn.Linear(dim, 1)
        self.binary = nn.Linear(dim, 1)

    def forward(self, regions: Tensor, region_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        slide, attn = self.pool(self.proj(regions), region_mask)
        return self.risk(slide).squeeze(-1), self.binary(slide).squeeze(-1), attn


class CellEcoNet(nn.Module):
    """Slides (B, R regions, M cells) -> risk, horizon probability, region and cell attention."""

    def __init__(self, n_words: int, cfg: ContextModelConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.encoder = RegionEncoder(n_words, cfg, seed)
        self.cell_pool = MaskedGatedPool(cfg.dim, cfg.dim)
        self.head = SlideHead(cfg.dim)
        self.mlm = nn.Linear(cfg.dim, n_words)

    def encode_regions(
        self,
        words: Tensor,
        types: Tensor,
        xy_um: Tensor,
        nbr_index: Tensor,
        nbr_mask: Tensor,
        cell_mask: Tensor,
        hide: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Regions (N, M) -> (cell vectors (N, M, D), region embeddings (N, D), cell attention)."""
        h = self.encoder(words, types, xy_um, nbr_index, nbr_mask, cell_mask, hide)
        region, cell_attn = self.cell_pool(h, cell_mask)
        return h, region, cell_attn

    def forward_train(
        self,
        words: Tensor,
        types: Tensor,
        xy_um: Tensor,
        nbr_index: Tensor,
        nbr_mask: Tensor,
        cell_mask: Tensor,
        region_mask: Tensor,
        hide: Tensor,
    ) -> dict[str, Tensor]:
        """All outputs for training: ``risk``, ``logit`` (B,), ``mlm_logits`` (B, R, M, W),
        ``region_attention`` (B, R), ``cell_attention`` (B, R, M)."""
        b, r, m = words.shape
        h, region, cell_attn = self.encode_regions(
            words.flatten(0, 1),
            types.flatten(0, 1),
            xy_um.flatten(0, 1),
            nbr_index.flatten(0, 1),
            nbr_mask.flatten(0, 1),
            cell_mask.flatten(0, 1),
            hide.flatten(0, 1),
        )
        risk, logit, region_attn = self.head(region.reshape(b, r, -1), region_mask)
        return {
            "risk": risk,
            "logit": logit,
            "mlm_logits": self.mlm(h).reshape(b, r, m, -1),
            "region_attention": region_attn,
            "cell_attention": cell_attn.reshape(b, r, m),
        }

    def forward(
        self,
        words: Tensor,
        types: Tensor,
        xy_um: Tensor,
        nbr_index: Tensor,
        nbr_mask: Tensor,
        cell_mask: Tensor,
        region_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(risk (B,), probability of recurrence within the horizon (B,), region attention
        (B, R), cell attention (B, R, M)); nothing hidden."""
        out = self.forward_train(
            words,
            types,
            xy_um,
            nbr_index,
            nbr_mask,
            cell_mask,
            region_mask,
            torch.zeros_like(cell_mask),
        )
        return (
            out["risk"],
            torch.sigmoid(out["logit"]),
            out["region_attention"],
            out["cell_attention"],
        )
