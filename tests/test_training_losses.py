"""The 4x4 token-to-tile mapping, the losses and the paired flip augmentation."""

from __future__ import annotations

import itertools

import pytest

from tests.torch_required import require_torch

torch = require_torch()

from training.augment import AugmentParams, apply_params, cut_tiles, paired_augment  # noqa: E402
from training.config import AugmentConfig  # noqa: E402
from training.losses import (  # noqa: E402
    DistillLoss,
    linear_cka,
    negative_cosine,
    pool_patch_tokens,
)


def _tokens_from_tiles(tiles: torch.Tensor, side: int = 16, grid: int = 4) -> torch.Tensor:
    """Patch tokens (B, side*side, D); the 4x4 block of tile (r, c) holds tile r*grid+c's vector."""
    b, _, d = tiles.shape
    block = side // grid
    img = tiles.view(b, grid, grid, d).repeat_interleave(block, 1).repeat_interleave(block, 2)
    return img.reshape(b, side * side, d)


def test_pooled_token_k_covers_the_patch_block_of_tile_k_in_row_major_order() -> None:
    # Each patch token carries its own (row, col) in the 16x16 grid.
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    tokens = torch.stack([rows, cols], -1).reshape(1, 256, 2)
    pooled = pool_patch_tokens(tokens, 4)[0]
    for k in range(16):
        r, c = divmod(k, 4)
        assert pooled[k].tolist() == [4 * r + 1.5, 4 * c + 1.5]


def test_only_the_correct_spatial_assignment_gives_the_minimum_local_loss() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 16, 32, generator=g)
    local = pool_patch_tokens(_tokens_from_tiles(teacher), 4)
    best = float(negative_cosine(local, teacher))
    assert best == pytest.approx(-1.0, abs=1e-6)
    # Every other assignment tried (transpose, flips, all transpositions of two tiles) is worse.
    grid = torch.arange(16).view(4, 4)
    perms = [grid.T.flatten(), grid.flip(0).flatten(), grid.flip(1).flatten()]
    for i, j in itertools.combinations(range(16), 2):
        p = torch.arange(16)
        p[i], p[j] = j, i
        perms.append(p)
    for p in perms:
        assert float(negative_cosine(local, teacher[:, p])) > best + 1e-3, p.tolist()


def test_distill_loss_is_global_plus_half_local_with_settable_weights() -> None:
    torch.manual_seed(0)
    loss = DistillLoss(24, 40, grid=4, hidden=40, global_weight=2.0, local_weight=0.25).eval()
    cls, patches, t = torch.randn(3, 24), torch.randn(3, 256, 24), torch.randn(3, 16, 40)
    with torch.no_grad():
        out = loss(cls, patches, t)
    assert float(out["loss"]) == pytest.approx(
        2.0 * float(out["global"]) + 0.25 * float(out["local"]), abs=1e-6
    )
    default = DistillLoss(24, 40)
    assert (default.global_weight, default.local_weight) == (1.0, 0.5)
    assert default.global_head.fc1.in_features == 24 and default.global_head.fc2.out_features == 40


def test_a_horizontal_flip_moves_tile_r_c_to_r_mirror_c_and_keeps_the_5x_correspondence() -> None:
    g = torch.Generator().manual_seed(1)
    hi = torch.rand(2, 3, 896, 896, generator=g)
    lo = torch.nn.functional.avg_pool2d(hi, 4)  # the 5x view of the same field
    cfg = AugmentConfig(
        hflip=1.0, vflip=0.0, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02
    )
    hi_a, lo_a = paired_augment(hi, lo, cfg, g)
    tiles, tiles_a = cut_tiles(hi, 4), cut_tiles(hi_a, 4)
    plain = AugmentParams(
        *(torch.zeros(2, dtype=torch.bool),) * 2, *(torch.ones(2),) * 3, torch.zeros(2)
    )
    for r, c in itertools.product(range(4), range(4)):
        # Same content, mirrored: compare flipped original tile with the augmented tile's geometry
        flipped = apply_params(tiles[:, r * 4 + (3 - c)], plain).flip(-1)
        geom = tiles_a[:, r * 4 + c]
        # colour jitter is applied too: correlation of the pixel patterns proves the placement
        a = (flipped - flipped.mean()).flatten()
        b = (geom - geom.mean()).flatten()
        assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.9
    # The student's pooled region k still shows the 20x tile k: 5x == area-downsampled 20x.
    down = torch.nn.functional.avg_pool2d(hi_a, 4)
    assert float((down - lo_a).abs().mean()) < 0.02


def test_linear_cka_is_one_for_rotated_copies_and_small_for_unrelated_features() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, x @ q * 3.0) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(x, torch.randn(200, 16, generator=g)) < 0.2
