"""ViT-Adapter for KPU knowledge preservation: a trainable side network around a frozen ViT trunk.

Chen, Duan, Wang, He, Lu, Dai, Qiao. "Vision Transformer Adapter for Dense Predictions." ICLR 2023
(code: ``czczup/ViT-Adapter``, ``adapter_modules.py`` / ``vit_adapter.py``); docs/methods.md

Structure (``D`` = the trunk's embedding dim, ``p`` = its patch size):

* **SPM** (spatial prior module): conv stem (3 x conv3x3 + BN + ReLU, maxpool) and three stride-2 convs give
  strides 4/8/16/32 with ``c, 2c, 4c, 4c`` channels (``c = conv_inplane``), each projected by a 1x1 conv to
  ``D``. The stride-8/16/32 maps are flattened to tokens ``c`` (plus a learned per-level embedding).
* **Interaction blocks** (one per group of trunk blocks, ``K = min(4, depth)`` evenly split groups):
  the *injector* ``x <- x + gamma * attn(LN(x), LN(c))`` adds adapter context to the ViT patch tokens with a
  per-channel gate ``gamma`` initialised to **zero**, then the trunk's blocks run, then the *extractor*
  ``c <- c + attn(LN(c), LN(x)); c <- c + ConvFFN(LN(c))`` pulls ViT context back into the adapter tokens.
  The last block has two extra extractors, as in the original.
* **Outputs**: four maps ``[B, D, H/s, W/s]`` for ``s = 4, 8, 16, 32``: ``f1 = up(c2) + c1``, each plus the
  (resized) ViT tokens of an interaction block, then BatchNorm per level.

Deviations from the original (documented choices): deformable attention (a custom CUDA op) is replaced by dense
multi-head cross-attention (``F.scaled_dot_product_attention``) with inner width ``deform_ratio * D``; prefix
tokens (CLS, registers) take no part in injection/extraction, they pass through the trunk's blocks untouched
by the adapter (as in the BEiT/DINOv2 adapters of the same repository).

Because every gate starts at zero, ``x + 0 * attn(...)`` is exactly ``x``: at initialisation the trunk's
tokens, and hence the student's pooled features, equal the bare sentinel's bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GridSize = tuple[int, int]


def _conv_bn(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """Convolutional stem giving the adapter its multi-scale spatial prior (ViT-Adapter ``SpatialPriorModule``).

    Args:
        dim: output channels ``D`` (the trunk's embedding dim).
        inplanes: base width ``c`` of the stem (64 in ViT-Adapter).
    """

    def __init__(self, dim: int, inplanes: int = 64) -> None:
        super().__init__()
        c = inplanes
        self.stem = nn.Sequential(*_conv_bn(3, c, 2), *_conv_bn(c, c, 1), *_conv_bn(c, c, 1),
                                  nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.conv2 = nn.Sequential(*_conv_bn(c, 2 * c, 2))
        self.conv3 = nn.Sequential(*_conv_bn(2 * c, 4 * c, 2))
        self.conv4 = nn.Sequential(*_conv_bn(4 * c, 4 * c, 2))
        self.proj = nn.ModuleList(nn.Conv2d(ch, dim, 1) for ch in (c, 2 * c, 4 * c, 4 * c))

    def forward(self, img: Tensor) -> list[Tensor]:
        """Image ``[B, 3, H, W]`` -> four maps ``[B, D, H/s, W/s]`` for strides ``s = 4, 8, 16, 32``."""
        c1 = self.stem(img)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [proj(c) for proj, c in zip(self.proj, (c1, c2, c3, c4))]


class CrossAttention(nn.Module):
    """Multi-head cross-attention ``query [B, Nq, D]`` attends to ``feat [B, Nk, D]`` -> ``[B, Nq, D]``.

    The dense stand-in for ViT-Adapter's ``MSDeformAttn``: inner width ``ratio * D`` (the ``deform_ratio``),
    rounded to a multiple of ``num_heads``.
    """

    def __init__(self, dim: int, num_heads: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.num_heads = num_heads
        inner = max(num_heads, int(round(dim * ratio / num_heads)) * num_heads)
        self.q = nn.Linear(dim, inner)
        self.kv = nn.Linear(dim, 2 * inner)
        self.out = nn.Linear(inner, dim)

    def forward(self, query: Tensor, feat: Tensor) -> Tensor:
        B, Nq, _ = query.shape
        q = self.q(query).view(B, Nq, self.num_heads, -1).transpose(1, 2)           # [B, h, Nq, d]
        k, v = self.kv(feat).view(B, feat.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)                                 # [B, h, Nq, d]
        return self.out(out.transpose(1, 2).reshape(B, Nq, -1))


class Injector(nn.Module):
    """``x <- x + gamma * attn(LN(x), LN(c))`` with a zero-initialised per-channel gate ``gamma [D]``."""

    def __init__(self, dim: int, num_heads: int, ratio: float) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.feat_norm = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads, ratio)
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """ViT patch tokens ``x [B, N, D]``, adapter tokens ``c [B, M, D]`` -> updated ``x [B, N, D]``."""
        return x + self.gamma * self.attn(self.query_norm(x), self.feat_norm(c))


class ConvFFN(nn.Module):
    """Linear -> depthwise 3x3 conv per pyramid level -> GELU -> Linear (ViT-Adapter ``ConvFFN``)."""

    def __init__(self, dim: int, hidden_ratio: float = 0.25) -> None:
        super().__init__()
        hidden = max(1, int(dim * hidden_ratio))
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, c: Tensor, shapes: list[GridSize]) -> Tensor:
        """Adapter tokens ``c [B, M, D]`` (levels of ``shapes`` concatenated) -> ``[B, M, D]``."""
        h = self.fc1(c)
        parts = []
        for part, (gh, gw) in zip(h.split([a * b for a, b in shapes], dim=1), shapes):
            grid = part.transpose(1, 2).reshape(h.shape[0], -1, gh, gw)
            parts.append(self.dwconv(grid).flatten(2).transpose(1, 2))
        return self.fc2(F.gelu(torch.cat(parts, dim=1)))


class Extractor(nn.Module):
    """``c <- c + attn(LN(c), LN(x)); c <- c + ConvFFN(LN(c))``: ViT tokens back into adapter tokens."""

    def __init__(self, dim: int, num_heads: int, ratio: float, ffn_ratio: float) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.feat_norm = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads, ratio)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = ConvFFN(dim, ffn_ratio)

    def forward(self, c: Tensor, x: Tensor, shapes: list[GridSize]) -> Tensor:
        """Adapter tokens ``c [B, M, D]``, ViT patch tokens ``x [B, N, D]`` -> updated ``c [B, M, D]``."""
        c = c + self.attn(self.query_norm(c), self.feat_norm(x))
        return c + self.ffn(self.ffn_norm(c), shapes)


class InteractionBlock(nn.Module):
    """One injector, a slice of trunk blocks (run by the caller), one or three extractors."""

    def __init__(self, dim: int, num_heads: int, ratio: float, ffn_ratio: float, extra_extractors: bool) -> None:
        super().__init__()
        self.injector = Injector(dim, num_heads, ratio)
        self.extractors = nn.ModuleList(Extractor(dim, num_heads, ratio, ffn_ratio)
                                        for _ in range(3 if extra_extractors else 1))


def interaction_indexes(depth: int, num_interactions: int = 4) -> list[tuple[int, int]]:
    """Split ``depth`` trunk blocks into ``min(num_interactions, depth)`` contiguous groups ``(first, last)``.

    ``interaction_indexes(12)`` is ViT-Adapter's ViT-B layout ``[(0, 2), (3, 5), (6, 8), (9, 11)]``.
    """
    k = max(1, min(num_interactions, depth))
    bounds = [round(i * depth / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(k)]


class ViTAdapter(nn.Module):
    """The trainable adapter around a frozen timm ``VisionTransformer`` trunk (Chen et al., ICLR 2023).

    The adapter owns no trunk weights; ``forward`` receives the trunk and runs its blocks between the
    interactions, so the trunk can stay frozen (and in eval mode) in its owner.

    Args:
        dim: the trunk's embedding dim ``D``.
        depth: number of trunk blocks.
        num_heads: attention heads of the cross-attentions (ViT-Adapter uses the trunk's head count).
        conv_inplane: SPM base width (64).
        num_interactions: interaction blocks ``K`` (4; capped at ``depth``).
        deform_ratio: inner width of the cross-attentions as a fraction of ``D`` (0.5).
        cffn_ratio: ConvFFN hidden ratio (0.25).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, *, conv_inplane: int = 64, num_interactions: int = 4,
                 deform_ratio: float = 0.5, cffn_ratio: float = 0.25) -> None:
        super().__init__()
        self.indexes = interaction_indexes(depth, num_interactions)
        self.spm = SpatialPriorModule(dim, conv_inplane)
        self.level_embed = nn.Parameter(torch.empty(3, dim).normal_(std=0.02))
        last = len(self.indexes) - 1
        self.interactions = nn.ModuleList(
            InteractionBlock(dim, num_heads, deform_ratio, cffn_ratio, extra_extractors=i == last)
            for i in range(len(self.indexes)))
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.norms = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(4))

    def forward(self, tokens: Tensor, img: Tensor, blocks: nn.Sequential, num_prefix: int, grid: GridSize,
                levels: Sequence[int] = (0, 1, 2, 3)) -> tuple[Tensor, list[Tensor]]:
        """Run the trunk's blocks with injections and extractions.

        Args:
            tokens: ``[B, P + N, D]`` trunk tokens after patch/pos embedding and ``norm_pre`` (``P`` prefix
                tokens first, then ``N = gh * gw`` patch tokens in row-major order).
            img: ``[B, 3, H, W]`` the input image (for the SPM).
            blocks: the trunk's transformer blocks.
            num_prefix: ``P``.
            grid: the patch grid ``(gh, gw)``.
            levels: which output maps to build (0..3 for strides 4/8/16/32); the others are skipped, so their
                output modules get no gradient.

        Returns:
            ``(tokens [B, P + N, D]`` after all blocks (before the trunk's final norm),
            the maps ``[B, D, H/s, W/s]`` of ``levels``, in that order).
        """
        spm = self.spm(img)
        shapes = [(m.shape[2], m.shape[3]) for m in spm[1:]]
        c = torch.cat([m.flatten(2).transpose(1, 2) + e for m, e in zip(spm[1:], self.level_embed)], dim=1)
        prefix, x = tokens[:, :num_prefix], tokens[:, num_prefix:]
        outs = []
        for (first, last), block in zip(self.indexes, self.interactions):
            x = block.injector(x, c)
            x = torch.cat([prefix, x], dim=1)
            for i in range(first, last + 1):
                x = blocks[i](x)
            prefix, x = x[:, :num_prefix], x[:, num_prefix:]
            for extractor in block.extractors:
                c = extractor(c, x, shapes)
            outs.append(x)
        return torch.cat([prefix, x], dim=1), self._pyramid(spm[0], c, shapes, outs, grid, levels)

    def _pyramid(self, c1: Tensor, c: Tensor, shapes: list[GridSize], outs: list[Tensor], grid: GridSize,
                 levels: Sequence[int]) -> list[Tensor]:
        """Adapter tokens ``c [B, M, D]`` + stride-4 map ``c1`` + per-interaction ViT tokens -> normed maps."""
        B, _, D = c.shape
        c2, c3, c4 = (t.transpose(1, 2).reshape(B, D, h, w)
                      for t, (h, w) in zip(c.split([h * w for h, w in shapes], dim=1), shapes))
        if 0 in levels:
            up = self.up(c2)
            c1 = c1 + _resize(up, c1.shape[-2:])
        maps = []
        for level in levels:
            m = (c1, c2, c3, c4)[level]
            vit = outs[level * len(outs) // 4].transpose(1, 2).reshape(B, D, *grid)       # [B, D, gh, gw]
            maps.append(self.norms[level](m + _resize(vit, m.shape[-2:])))
        return maps


def _resize(x: Tensor, size: torch.Size | GridSize) -> Tensor:
    """Bilinear resize of ``[B, D, h, w]`` to ``size`` (identity when already that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def closest_level(patch_size: int) -> int:
    """Index (0..3) of the pyramid level whose stride (4/8/16/32) is closest to ``patch_size`` in log scale."""
    return min(range(4), key=lambda i: abs(math.log2(4 * 2 ** i) - math.log2(patch_size)))
