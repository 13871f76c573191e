"""PEFT's BOFT with m > 1 factors on a machine without its CUDA extension — a monkeypatch for the bench and the tests
that compare boftlab with PEFT there; nothing in the library uses it.

PEFT silently falls back to one factor when ``fbd_cuda`` does not build (any CPU machine): timing or testing its BOFT
with m = 2 there would measure OFT. ``peft_boft_without_cuda`` lets it compute the real BOFT.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def peft_boft_without_cuda() -> Iterator[None]:
    """Let PEFT's BOFT run m > 1 factors on a machine without its CUDA extension.

    PEFT silently falls back to one factor when ``fbd_cuda`` does not build (any CPU machine); inside this
    context its block-diagonal assembly is done by ``torch.block_diag`` instead, so PEFT computes the real BOFT.
    """

    def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:  # (m, k, b, b) -> (m, k·b, k·b)
        return torch.stack([torch.block_diag(*factor) for factor in blocks])

    from peft.tuners.boft import layer

    block_diag_class = layer.FastBlockDiag
    get_fbd_cuda = layer.get_fbd_cuda
    own_apply = block_diag_class.__dict__.get("apply")  # None: ``apply`` is inherited from autograd.Function
    layer.get_fbd_cuda = lambda: True
    block_diag_class.apply = staticmethod(block_diagonal)
    try:
        yield
    finally:
        layer.get_fbd_cuda = get_fbd_cuda
        if own_apply is None:
            del block_diag_class.apply
        else:
            block_diag_class.apply = own_apply
