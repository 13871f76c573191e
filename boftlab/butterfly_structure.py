"""The butterfly structure itself: which coordinates each BOFT factor mixes, and two ways to apply the product.

R = B_m ⋯ B_1 with B_i = P_i · blockdiag(Q_i1 … Q_ik) · P_iᵀ (d × d; k = d/b blocks of size b; P_1 = I). Given the
blocks Q as a tensor (m, k, b, b), this module multiplies rows by R or Rᵀ without forming it:

* ``butterfly_apply``           the reference: m index gathers (``gather_schedule``) around m batched b × b products;
* ``butterfly_apply_reshaped``  the fused kernel's plan: the same product with reshapes only, no gathers.

It imports nothing else of boftlab, so ``butterfly.py`` (the BOFT layer) and ``kernels/`` (the fused Triton kernel)
both build on it without importing each other.
"""

from __future__ import annotations

import math

import torch


def butterfly_permutation(dim: int, block_size: int, factor: int) -> torch.Tensor:
    """Index vector ``perm`` of P_{factor+1} (``P[j, perm[j]] = 1``); factor 0 is the identity. O(d)."""
    if factor == 0:
        return torch.arange(dim)
    half = block_size // 2
    chunk = block_size * 2**factor  # coordinates one butterfly stage mixes
    pieces = torch.arange(chunk // half)
    order = torch.cat([pieces[0::2], pieces[1::2]])  # even halves first, then odd halves
    within = (order[:, None] * half + torch.arange(half)).reshape(-1)  # (chunk,)
    starts = torch.arange(0, dim, chunk)
    return (starts[:, None] + within).reshape(-1)


def gather_schedule(dim: int, block_size: int, n_factors: int, transpose: bool) -> list[torch.Tensor | None]:
    """The m+1 index gathers around the m block products of ``x @ R`` (or ``x @ Rᵀ``), adjacent ones fused.

    Row form: x @ B_i = ((x @ P_i) @ blockdiag(Q_i)) @ P_iᵀ, and for index vectors ``x @ P = x[..., inverse(perm)]``,
    ``x @ Pᵀ = x[..., perm]``. ``x @ R`` runs the factors from the last to the first, ``x @ Rᵀ`` the other way.
    Identity gathers are returned as ``None``.
    """
    perms = [butterfly_permutation(dim, block_size, i) for i in range(n_factors)]
    inverses = [torch.argsort(p) for p in perms]
    order = list(range(n_factors)) if transpose else list(range(n_factors - 1, -1, -1))
    gathers = [inverses[order[0]]]
    gathers += [perms[prev][inverses[cur]] for prev, cur in zip(order, order[1:])]  # x[a][b] == x[a[b]]
    gathers.append(perms[order[-1]])
    identity = torch.arange(dim)
    return [None if torch.equal(g, identity) else g for g in gathers]


def butterfly_apply(
    x: torch.Tensor, blocks: torch.Tensor, gathers: list[torch.Tensor | None], transpose: bool = False
) -> torch.Tensor:
    """x: (..., d) -> x @ R, or x @ Rᵀ with ``transpose``; blocks: (m, k, b, b). O(d·b·m) per row.

    ``gathers`` comes from ``gather_schedule`` for the same direction.
    """
    n_factors, n_blocks, block_size, _ = blocks.shape
    order = range(n_factors) if transpose else range(n_factors - 1, -1, -1)
    shape = x.shape
    for step, i in enumerate(order):
        if gathers[step] is not None:
            x = x[..., gathers[step]]
        q = blocks[i].transpose(-1, -2) if transpose else blocks[i]
        x = x.reshape(*shape[:-1], n_blocks, block_size)  # (..., k, b)
        x = torch.einsum("...kr,krc->...kc", x, q).reshape(shape)
    if gathers[-1] is not None:
        x = x[..., gathers[-1]]
    return x


def butterfly_apply_reshaped(x: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x: (..., d) -> x @ R (or x @ Rᵀ); blocks: (m, k, b, b). O(d·b·m) per row, no gathers, only reshapes.

    The same result as ``butterfly_apply`` with ``gather_schedule``'s gathers. Conjugating blockdiag(Q_i) by P_i
    only changes *which* coordinates a block mixes: viewed as (d / (b·s), 2, s, b/2) with s = 2^i — [chunk, half h,
    piece c, position t] — a row has one block per (chunk, c), acting on the b coordinates (h, t), and block
    (chunk, c) is block number chunk·s + c of factor i. This is the plan of the fused kernel (``kernels/``).
    """
    n_factors, n_blocks, block_size, _ = blocks.shape
    order = range(n_factors) if transpose else range(n_factors - 1, -1, -1)
    shape = x.shape
    for i in order:
        stride = 2**i
        q = blocks[i].transpose(-1, -2) if transpose else blocks[i]
        x = x.reshape(*shape[:-1], -1, 2, stride, block_size // 2)  # (..., chunks, h, c, t)
        x = x.transpose(-2, -3).reshape(*shape[:-1], n_blocks, block_size)  # (..., k, b): block = chunk·s + c
        x = torch.einsum("...kr,krc->...kc", x, q)
        x = x.reshape(*shape[:-1], -1, stride, 2, block_size // 2).transpose(-2, -3).reshape(shape)
    return x


def valid_block_sizes(dim: int, n_factors: int) -> list[int]:
    """Block sizes b ≥ 2 for which b·2^(m−1) divides d (and b is even when m > 1, so P_i can halve blocks)."""
    step = 2 ** (n_factors - 1)
    return [b for b in range(2, dim + 1) if dim % (b * step) == 0 and (n_factors == 1 or b % 2 == 0)]


def valid_n_factors(dim: int, block_size: int) -> list[int]:
    """Numbers of factors m that fit (d, b); the largest, log2(d/b)+1 when d/b is a power of two, makes R dense."""
    if dim % block_size:
        return []
    if block_size % 2:
        return [1]
    k = dim // block_size
    return [m for m in range(1, int(math.log2(k)) + 2) if k % 2 ** (m - 1) == 0]
