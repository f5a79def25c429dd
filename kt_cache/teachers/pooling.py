"""Shape helpers shared by the teacher sources: spatial maps / patch tokens -> a fixed g x g grid.

All functions work on the meta device too, so ``resolve`` learns output shapes without weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pool_map(fmap: torch.Tensor, grid: int) -> torch.Tensor:
    """Average-pool a channels-first map to a square grid, channels last.

    Args:
        fmap: ``[B, C, h, w]``.
        grid: g.

    Returns:
        ``[B, g, g, C]`` (maps smaller than g are repeated by adaptive pooling).
    """
    return F.adaptive_avg_pool2d(fmap, grid).permute(0, 2, 3, 1)


def token_grid(num_tokens: int, hint: tuple[int, int] | None) -> tuple[int, int]:
    """The (rows, cols) patch grid of ``num_tokens`` spatial tokens.

    Args:
        num_tokens: N, spatial tokens only (prefix tokens already dropped).
        hint: the model's own patch grid for this input, used when its product equals N.

    Raises:
        ValueError: when N is neither the hint's product nor a square number.
    """
    if hint is not None and hint[0] * hint[1] == num_tokens:
        return int(hint[0]), int(hint[1])
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} spatial tokens do not form a square grid and the model gives no patch grid")
    return side, side


def tokens_to_map(tokens: torch.Tensor, num_prefix: int, hint: tuple[int, int] | None) -> torch.Tensor:
    """Patch tokens -> channels-first map.

    Args:
        tokens: ``[B, N, C]`` including ``num_prefix`` leading class/register/distillation tokens.
        num_prefix: tokens to drop from the front.
        hint: the model's (rows, cols) patch grid, if known.

    Returns:
        ``[B, C, rows, cols]``.
    """
    spatial = tokens[:, num_prefix:]
    rows, cols = token_grid(spatial.shape[1], hint)
    return spatial.transpose(1, 2).reshape(spatial.shape[0], spatial.shape[2], rows, cols)


def timm_grid_hint(model: torch.nn.Module, height: int, width: int) -> tuple[int, int] | None:
    """A timm model's patch grid for an input of ``height x width`` (None when it has no patch embed)."""
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        return None
    if hasattr(embed, "dynamic_feat_size"):
        try:
            rows, cols = embed.dynamic_feat_size((height, width))
            return int(rows), int(cols)
        except Exception:  # noqa: BLE001 - fall back to the static grid
            pass
    grid = getattr(embed, "grid_size", None)
    return (int(grid[0]), int(grid[1])) if grid is not None else None


def timm_featmap(features: torch.Tensor, model: torch.nn.Module, input_hw: tuple[int, int], grid: int) -> torch.Tensor:
    """Pool a timm ``forward_features`` output to ``[B, g, g, C]``.

    Args:
        features: ``[B, C, h, w]`` (NCHW CNNs), ``[B, h, w, C]`` (models with ``output_fmt == "NHWC"``,
            e.g. Swin) or ``[B, N, C]`` tokens (ViTs; ``model.num_prefix_tokens`` leading tokens dropped).
        model: the timm model that produced ``features``.
        input_hw: (H, W) of the input pixels, for the patch grid.
        grid: g.

    Raises:
        ValueError: for outputs that are not spatial (e.g. already pooled ``[B, C]``).
    """
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"forward_features returned a {type(features).__name__}, not one spatial tensor")
    if features.ndim == 4:
        fmt = str(getattr(model, "output_fmt", "NCHW"))
        fmap = features.permute(0, 3, 1, 2) if fmt.endswith("NHWC") else features
        return pool_map(fmap, grid)
    if features.ndim == 3:
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        fmap = tokens_to_map(features, prefix, timm_grid_hint(model, *input_hw))
        return pool_map(fmap, grid)
    raise ValueError(f"forward_features returned shape {tuple(features.shape)}, which has no spatial layout")


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (meta tensors count by dtype and shape)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return int(sum(t.numel() * t.element_size() for t in tensors))
