"""Fused GPU kernels. Importing this package does not import Triton: it loads on the first CUDA call.

``fused_supported(x, blocks)`` says whether ``butterfly_apply_fused`` can replace
``butterfly_structure.butterfly_apply_reshaped`` for these tensors (CUDA, Triton importable, supported block size /
factors / dtype); the result is the same to fp tolerance, so callers may dispatch on it. ``fused_available`` answers
the same from a device, shape and dtype (for cost models, before any tensor exists).

Which implementation a layer uses is a switch with two settings, ``KERNELS``:

* ``"auto"``  — the fused kernel wherever ``fused_supported`` says it runs, the PyTorch path everywhere else;
* ``"torch"`` — always the PyTorch path (the reference; benchmarks time it on GPUs too).

A config chooses it (``BOFTConfig(kernel=...)``), and the environment variable ``BOFTLAB_KERNEL=torch`` forces the
PyTorch path for every layer built while it is set (unset or ``auto``: each config decides). Nothing falls back
silently: if the kernel fails to compile or launch, ``butterfly_apply_fused`` raises ``FusedKernelError``, whose
message names both switches.
"""

from __future__ import annotations

import torch

from .switch import KERNEL_ENV, KERNELS, FusedKernelError, kernel_in_force

__all__ = ["KERNELS", "KERNEL_ENV", "FusedKernelError", "kernel_in_force", "fused_available", "fused_supported",
           "butterfly_apply_fused", "triton_available"]


def fused_available(device: torch.device, dim: int, block_size: int, n_factors: int, dtype: torch.dtype) -> bool:
    """Whether the fused kernel runs for rows of ``dtype`` and width ``dim`` on ``device`` with (b, m). O(1)."""
    if device.type != "cuda":
        return False  # decided without importing Triton
    from .butterfly_triton import triton, unsupported_reason

    return triton is not None and unsupported_reason(dim, block_size, n_factors, dtype) is None


def fused_supported(x: torch.Tensor, blocks: torch.Tensor) -> bool:
    """Whether the fused Triton butterfly kernel runs for rows ``x`` (..., d) and blocks (m, k, b, b). O(1)."""
    if not (x.is_cuda and blocks.is_cuda):
        return False  # decided without importing Triton
    from .butterfly_triton import fused_supported as supported

    return supported(x, blocks)


def butterfly_apply_fused(x: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x: (..., d) -> x @ R (or x @ Rᵀ) in one fused pass; see ``butterfly_triton.butterfly_apply_fused``."""
    from .butterfly_triton import butterfly_apply_fused as apply

    return apply(x, blocks, transpose)


def triton_available() -> bool:
    """Whether Triton imports here (it is imported to find out: ask only where a fused kernel may run). O(import)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
