"""Fused GPU kernels. Importing this package does not import Triton: it loads on the first CUDA call.

``fused_supported(x, blocks)`` says whether ``butterfly_apply_fused`` can replace ``butterfly.butterfly_apply`` for
these tensors (CUDA, Triton importable, supported block size / factors / dtype); the result is the same to fp
tolerance, so callers may dispatch on it.
"""

from __future__ import annotations

import torch


def fused_supported(x: torch.Tensor, blocks: torch.Tensor) -> bool:
    """Whether the fused Triton butterfly kernel runs for rows ``x`` (..., d) and blocks (m, k, b, b). O(1)."""
    if not (x.is_cuda and blocks.is_cuda):
        return False  # decided without importing Triton
    from .butterfly_triton import fused_supported as supported

    return supported(x, blocks)


def butterfly_apply_fused(
    x: torch.Tensor, blocks: torch.Tensor, gathers: list[torch.Tensor | None], transpose: bool = False
) -> torch.Tensor:
    """x: (..., d) -> x @ R (or x @ Rᵀ) in one fused pass; see ``butterfly_triton.butterfly_apply_fused``."""
    from .butterfly_triton import butterfly_apply_fused as apply

    return apply(x, blocks, gathers, transpose)
